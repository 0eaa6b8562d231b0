"""A synthetic stand-in for the SCIN bucket, laid out exactly like ``gs://dx-scin-public-data``.

No SCIN photograph can be reached offline, so the demo and the tests run on a *synthetic mirror*: the
release's two CSVs (real rows, copied verbatim, or generated rows in the same columns and formats), one
drawn image per image reference, a marker file saying the images are not SCIN photographs, and the
ground truth of what was planted. The whole mirror is a pure function of its arguments.

The modules, by concern:

- ``mirror``: the layout on disk and ``write_synthetic_mirror``, the entry point;
- ``metadata``: which cases (seeded subsets of real rows) and generated rows in the release's formats;
- ``skin``: the skin canvas (Monk tone colour, lighting, mottling, texture) and erythema colours;
- ``lesions``: the lesion pattern of each condition, painted on the canvas;
- ``defects``: the planted problems (which file gets which, and the bytes each file then holds);
- ``encoding``: PNG/JPEG bytes and the decompression-bomb PNG;
- ``seeds``: the stable hashes and seeded generators everything above draws from.
"""

"""Case patterns on the REAL SCIN metadata: clusters of every case (labelled or not) on the questionnaire.

    python bench/case_patterns_real.py              # bundled real metadata (scin_pipeline/data/scin)
    SCIN_METADATA_DIR=... python bench/case_patterns_real.py
    python bench/case_patterns_real.py --n-bootstrap 20 --out /tmp/patterns   # a quick look elsewhere

The same rules as the ``case_patterns`` asset (``core.case_patterns.find_case_patterns``), on all 5,033
cases of the release. No SCIN image is reachable offline, so only the questionnaire view is computed: a
real result about the real answers. Writes docs/results/case_patterns.md and its maps beside it in
docs/results/case_patterns/.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

from scin_pipeline.core import bundled_metadata
from scin_pipeline.core import case_patterns as cp
from scin_pipeline.core.metadata import parse_metadata

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-bootstrap", type=int, default=100)
    parser.add_argument("--out", type=Path, default=OUT, help="folder of case_patterns.md (maps in a subfolder)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()
    source = Path(os.environ.get("SCIN_METADATA_DIR") or bundled_metadata.metadata_dir())
    parsed = parse_metadata((source / "scin_cases.csv").read_bytes(), (source / "scin_labels.csv").read_bytes())
    config = cp.PatternConfig(n_bootstrap=args.n_bootstrap)
    patterns = cp.find_case_patterns(parsed.cases, config)
    seconds = time.perf_counter() - started

    maps_dir = args.out / "case_patterns"
    maps_dir.mkdir(parents=True, exist_ok=True)
    maps = cp.map_pngs(patterns)
    for name, png in maps.items():
        (maps_dir / f"{name}.png").write_bytes(png)
    intro = (
        f"Real SCIN 1.0.0 metadata (`{source.name}`), every case, labelled or not; no image (none is reachable "
        f"offline), so the questionnaire view only. Config: k in [{config.k_min}, {config.k_max}], PCA keeping "
        f"{config.variance_kept:.0%} of the variance (at most {config.max_components} components), k-means with "
        f"{config.n_init} restarts, silhouette on {config.silhouette_sample:,} sampled cases, {config.n_bootstrap} "
        f"bootstrap refits, seed {config.seed}. Produced by `bench/case_patterns_real.py` in {seconds:.0f} s "
        "(2-core development machine, shared). Labels: the top weighted dermatologist label of a labelled case."
    )
    markdown = cp.patterns_markdown(
        patterns,
        title="Case patterns on the real SCIN metadata",
        intro=intro,
        plots={name: f"case_patterns/{name}.png" for name in maps},
    )
    (args.out / "case_patterns.md").write_text(markdown)
    print(patterns.summary().to_string(index=False))
    print(cp.cluster_summary(patterns, cp.QUESTIONNAIRE).to_string(index=False))
    print(f"wrote {args.out / 'case_patterns.md'} in {seconds:.1f} s")


if __name__ == "__main__":
    main()

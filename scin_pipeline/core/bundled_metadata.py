"""The real SCIN 1.0.0 metadata shipped inside the package: where it is and whether it is intact.

The one owner of ``scin_pipeline/data/scin/`` (the four CSVs of the release, its LICENSE and a README;
no image). Everything that wants the bundled files (the demo, the tests) asks ``metadata_dir()`` for a
real folder and may call ``verify()``, which checks every file against the published SHA-256 below.

Licence: the SCIN Data Use License (``LICENSE`` beside the files), not this code's Apache-2.0; any attempt
to re-identify contributors is forbidden. Cite Ward et al., "Crowdsourcing Dermatology Images with Google
Search Ads: Creating a Real-World Skin Condition Dataset", arXiv:2402.18545 (2024). See ATTRIBUTION.md
beside the files.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import tempfile
import threading
from importlib import resources
from pathlib import Path

PACKAGE = "scin_pipeline.data.scin"
RELEASE = "1.0.0"
DESCRIPTION = f"bundled real SCIN {RELEASE} metadata"

CASES_FILE = "scin_cases.csv"
LABELS_FILE = "scin_labels.csv"

# SHA-256 of the files of SCIN release 1.0.0, as published in gs://dx-scin-public-data/dataset/ (the CSVs)
# and shipped beside them (LICENSE, README.md). A changed byte is a different release: verify() says so.
SHA256: dict[str, str] = {
    "scin_cases.csv": "7923ee9ba9775af413ca115c4587dc1bd32259d7936aa97fa80d88dd616ca3c3",
    "scin_labels.csv": "616ad03c24c304f5f7ef01b4116e4d3274f1c71c9b19a0e3d5620698b081a9fe",
    "scin_app_questions.csv": "32d38ef1628e9f4e6ce770870850489790ebbdf91b0421c192afc9ebce035052",
    "scin_label_questions.csv": "c007d0af2877afa977a5680aae6d630a7592eb0582dea503b30978f3ddb98cb0",
    "LICENSE": "e29f7f0a84f0ad50e4920fa195e852bcd14c9e8b9e6c899ce9e3276be0b75da4",
    "README.md": "ceea6a339c3bf95843796d5c48e1272b02b59f294ad47a81cdd676da5b06a963",
}
FILES: tuple[str, ...] = tuple(SHA256)


class BundledMetadataError(RuntimeError):
    """The bundled metadata is missing or differs from the published release."""


_lock = threading.Lock()
_extracted: Path | None = None
_cleanup = contextlib.ExitStack()
atexit.register(_cleanup.close)


def metadata_dir() -> Path:
    """A real filesystem folder holding the bundled files.

    Installed from a folder (the normal case, editable or not): the package's own folder. Imported from a
    zip: the files are copied once into a temporary folder, removed when the interpreter exits.
    """
    root = resources.files(PACKAGE)
    if isinstance(root, Path):
        return root
    global _extracted
    with _lock:
        if _extracted is None:
            _extracted = _extract(root)
        return _extracted


def _extract(root) -> Path:
    # Python >= 3.12: as_file copies a whole directory out of a zip. 3.11 handles single files only.
    with contextlib.suppress(OSError, TypeError, ValueError):
        folder = Path(_cleanup.enter_context(resources.as_file(root)))
        if all((folder / name).is_file() for name in FILES):
            return folder
    folder = Path(_cleanup.enter_context(tempfile.TemporaryDirectory(prefix="scin-metadata-")))
    for name in FILES:
        entry = root.joinpath(name)
        if entry.is_file():
            (folder / name).write_bytes(entry.read_bytes())
    return folder


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatches(folder: Path | None = None) -> dict[str, str]:
    """{file name: what is wrong} for every file of the release that is missing or differs in ``folder``
    (default: the bundled folder); empty when all match."""
    folder = metadata_dir() if folder is None else Path(folder)
    problems: dict[str, str] = {}
    for name, expected in SHA256.items():
        path = folder / name
        if not path.is_file():
            problems[name] = "missing"
            continue
        actual = file_sha256(path)
        if actual != expected:
            problems[name] = f"sha256 {actual}, expected {expected}"
    return problems


def verify(folder: Path | None = None) -> Path:
    """Check every file against the published SHA-256; return the folder, or raise BundledMetadataError
    naming each missing or differing file."""
    folder = metadata_dir() if folder is None else Path(folder)
    problems = mismatches(folder)
    if problems:
        listed = "; ".join(f"{name}: {what}" for name, what in problems.items())
        raise BundledMetadataError(f"SCIN {RELEASE} metadata in {folder} does not match the release: {listed}")
    return folder

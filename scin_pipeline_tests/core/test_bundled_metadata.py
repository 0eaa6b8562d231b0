"""The real SCIN 1.0.0 metadata shipped in the package: present, byte-identical to the published release,
reachable as a real folder (also from a zip), and the shared test fixture uses it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from scin_pipeline.core import bundled_metadata as bm

REPO_ROOT = Path(__file__).resolve().parents[2]
# The reference copy beside the repository (the shared/ folder of the development machine and CI).
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "data" / "scin"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_published_file_is_bundled_with_its_published_sha256():
    folder = bm.metadata_dir()
    assert folder.is_dir()
    assert set(bm.FILES) == {
        "scin_cases.csv",
        "scin_labels.csv",
        "scin_app_questions.csv",
        "scin_label_questions.csv",
        "LICENSE",
        "README.md",
    }
    for name, expected in bm.SHA256.items():
        assert _sha256(folder / name) == expected, name
    assert bm.mismatches() == {}
    assert bm.verify() == folder


def test_attribution_note_names_licence_citation_and_the_re_identification_ban():
    text = (bm.metadata_dir() / "ATTRIBUTION.md").read_text()
    assert "arXiv:2402.18545" in text and "Ward" in text
    assert "SCIN Data Use License" in text
    assert "re-identify" in text and "forbidden" in text


def test_bundled_copy_matches_the_reference_copy_beside_the_repository():
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"no reference copy at {REFERENCE_DIR} (only the published SHA-256 are checked)")
    for name in bm.FILES:
        assert _sha256(REFERENCE_DIR / name) == bm.SHA256[name], f"reference {name} differs from the release"
        assert (REFERENCE_DIR / name).read_bytes() == (bm.metadata_dir() / name).read_bytes(), name


def test_verify_names_a_changed_and_a_missing_file(tmp_path):
    for name in bm.FILES:
        (tmp_path / name).write_bytes((bm.metadata_dir() / name).read_bytes())
    (tmp_path / "scin_labels.csv").write_bytes((tmp_path / "scin_labels.csv").read_bytes() + b"\n")
    (tmp_path / "LICENSE").unlink()
    problems = bm.mismatches(tmp_path)
    assert set(problems) == {"scin_labels.csv", "LICENSE"} and problems["LICENSE"] == "missing"
    with pytest.raises(bm.BundledMetadataError, match="scin_labels.csv: sha256 .*LICENSE: missing"):
        bm.verify(tmp_path)


def test_the_shared_fixture_is_the_bundled_copy_unless_overridden(scin_metadata_dir):
    if os.environ.get("SCIN_METADATA_DIR"):
        assert (scin_metadata_dir / "scin_cases.csv").is_file()
    else:
        assert scin_metadata_dir == bm.metadata_dir()


def test_a_zipped_package_yields_a_real_folder(tmp_path):
    """Imported from a zip (no folder on disk), the files are copied out once and still verify."""
    package = Path(bm.__file__).resolve().parents[1]
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel in (
            "__init__.py",
            "core/__init__.py",
            "core/bundled_metadata.py",
            "data/__init__.py",
            "data/scin/__init__.py",
            *(f"data/scin/{name}" for name in bm.FILES),
        ):
            zf.write(package / rel, f"scin_pipeline/{rel}")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from scin_pipeline.core import bundled_metadata as bm; "
        "assert bm.__file__.startswith(sys.argv[1]), bm.__file__; "
        "d = bm.metadata_dir(); assert d.is_dir() and bm.verify() == d; print(d)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(archive)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    extracted = Path(result.stdout.strip())
    assert not extracted.exists()  # removed when the interpreter exited

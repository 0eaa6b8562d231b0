"""A hand-made mirror in the bucket's layout, small enough to reason about exactly in assertions.

Cases (all in the release's CSV format, with the real header lists):
  101  two images (1.png, 2.png), labelled Eczema
  102  one image shared with 103 (3.png: the release's "exact reuse"), labelled Urticaria
  103  3.png again plus 4.png, unlabelled (quality insufficient)
  104  a path traversal reference and a reference to 5.png, which is absent from the mirror (missing)
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from scin_pipeline.core import schema

TRAVERSAL = "dataset/images/../../etc/passwd"
MISSING_IMAGE = "dataset/images/5.png"

_CASES = [
    ("101", ["dataset/images/1.png", "dataset/images/2.png"], "FST2", "AGE_30_TO_39", "FEMALE"),
    ("102", ["dataset/images/3.png"], "FST5", "AGE_18_TO_29", "MALE"),
    ("103", ["dataset/images/3.png", "dataset/images/4.png"], "", "AGE_UNKNOWN", "OTHER_OR_UNSPECIFIED"),
    ("104", [TRAVERSAL, MISSING_IMAGE], "FST3", "AGE_40_TO_49", "FEMALE"),
]
_LABELS = {
    "101": ("['Eczema', 'Psoriasis']", "[4, 2]", "{'Eczema': 0.67, 'Psoriasis': 0.33}", "2", "FST2"),
    "102": ("['Urticaria']", "[5]", "{'Urticaria': 1.0}", "8", "FST5"),
    "103": ("[]", "[]", "{}", "", ""),
    "104": ("['Tinea']", "[3]", "{'Tinea': 1.0}", "4", "FST3"),
}


def cases_csv() -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=schema.CASES_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for case_id, paths, fst, age, sex in _CASES:
        row = dict.fromkeys(schema.CASES_COLUMNS, "")
        row.update(
            case_id=case_id,
            source="SCIN",
            release="1.0.0",
            year="2023",
            age_group=age,
            sex_at_birth=sex,
            fitzpatrick_skin_type=fst,
            textures_flat="YES",
            body_parts_arm="YES",
            related_category="RASH",
            condition_duration="ONE_DAY",
        )
        for i, path in enumerate(paths, start=1):
            row[f"image_{i}_path"], row[f"image_{i}_shot_type"] = path, "CLOSE_UP"
        writer.writerow(row)
    return out.getvalue()


def labels_csv() -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=schema.LABELS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for case_id, (names, conf, weighted, tone, fst) in _LABELS.items():
        row = dict.fromkeys(schema.LABELS_COLUMNS, "")
        grade = "DEFAULT_YES_IMAGE_QUALITY_SUFFICIENT" if tone else "NO_IMAGE_QUALITY_INSUFFICIENT"
        row.update(
            {
                "case_id": case_id,
                schema.GRADABLE_CONDITION_COLUMNS[0]: grade,
                schema.LABEL_NAMES_COLUMN: names,
                schema.LABEL_CONFIDENCE_COLUMN: conf,
                schema.WEIGHTED_LABEL_COLUMN: weighted,
                schema.GRADABLE_FST_COLUMNS[0]: "YES" if fst else "NO",
                schema.DERM_FST_COLUMNS[0]: fst,
                "monk_skin_tone_label_us": tone,
                "monk_skin_tone_label_india": tone,
                "gradable_for_monk_skin_tone_us": "True",
                "gradable_for_monk_skin_tone_india": "True",
            }
        )
        writer.writerow(row)
    return out.getvalue()


def write_tiny_mirror(root: Path) -> Path:
    images = root / "dataset" / "images"
    images.mkdir(parents=True)
    (root / "dataset" / "scin_cases.csv").write_text(cases_csv())
    (root / "dataset" / "scin_labels.csv").write_text(labels_csv())
    rng = np.random.default_rng(0)
    for image_id in ("1", "2", "3", "4"):  # 5.png deliberately absent
        pixels = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{image_id}.png")
    return root

"""Object paths of the SCIN release, and the rule that decides which image paths may ever be opened.

Paths read from the CSVs are data, not trusted file paths: an image reference is accepted only when it is
exactly ``dataset/images/<signed 64-bit int>.png``. Anything else (``..``, an absolute path, a backslash,
another folder, another extension) is rejected with a reason and never joined onto a filesystem path.
"""

from __future__ import annotations

import re

BUCKET = "dx-scin-public-data"
GCS_URI = f"gs://{BUCKET}"
DATASET_PREFIX = "dataset/"
IMAGE_PREFIX = "dataset/images/"
CASES_OBJECT = "dataset/scin_cases.csv"
LABELS_OBJECT = "dataset/scin_labels.csv"
METADATA_OBJECTS = (CASES_OBJECT, LABELS_OBJECT)

# A signed 64-bit integer: optional minus, no leading zeros (SCIN ids are int64 printed by Python).
_IMAGE_PATH = re.compile(r"dataset/images/(-?(?:0|[1-9][0-9]{0,18}))\.png")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class UnsafeObjectPath(ValueError):
    """An image reference that is not of the form dataset/images/<signed int>.png."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"rejected image path {path!r}: {reason}")
        self.path = path
        self.reason = reason


def image_id_from_path(path: str) -> str:
    """Return the image id of a valid image object path, or raise UnsafeObjectPath with the reason."""
    if not isinstance(path, str) or not path:
        raise UnsafeObjectPath(str(path), "empty path")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path) or path.startswith("\\"):
        raise UnsafeObjectPath(path, "absolute path")
    if "\\" in path:
        raise UnsafeObjectPath(path, "backslash in path")
    if any(part in ("..", ".") for part in path.split("/")):
        raise UnsafeObjectPath(path, "path traversal ('.' or '..' segment)")
    if "\x00" in path or any(ord(c) < 32 for c in path):
        raise UnsafeObjectPath(path, "control character in path")
    if not path.startswith(IMAGE_PREFIX):
        raise UnsafeObjectPath(path, f"outside {IMAGE_PREFIX}")
    match = _IMAGE_PATH.fullmatch(path)
    if match is None:
        raise UnsafeObjectPath(path, "file name is not <signed int>.png")
    image_id = match.group(1)
    if not _INT64_MIN <= int(image_id) <= _INT64_MAX:
        raise UnsafeObjectPath(path, "image id outside the signed 64-bit range")
    return image_id


def image_object_path(image_id: str) -> str:
    """The bucket object path of an image id (the inverse of image_id_from_path)."""
    path = f"{IMAGE_PREFIX}{image_id}.png"
    image_id_from_path(path)  # raises on an id that would not round-trip
    return path

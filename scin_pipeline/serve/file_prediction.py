"""``scin-pipeline predict``: classify image files and folders with a registered model, one CSV row per image.

The model is loaded as the web service loads it (:mod:`.model`: the version behind ``models:/NAME@ALIAS``,
unwrapped to its packaged classifier), and every image goes through the service's own steps
(:mod:`.prediction`): the guarded decoder (header checks and the pixel cap before any pixel buffer exists),
the quality verdict on the full-size pixels, training's preprocessing, then the package's calibrated
``predict_proba``, many images per call. No questionnaire is read: a ``keras_multimodal`` model sees every
case as unanswered, as the page does when nobody fills the form.

- Paths: a file named on the command line is tried whatever its suffix (the decoder judges the bytes); a
  folder is searched recursively for files with an image suffix (``IMAGE_SUFFIXES``, any case). Paths keep
  the form the user gave (a folder ``photos`` yields ``photos/a/1.png``), sorted, each file once.
- A file that cannot be classified (unreadable, not PNG/JPEG, corrupt, truncated, over the pixel cap or the
  byte cap, a side under 16 px) gets a row with ``status`` ``error``, an error code and the decoder's
  message, which names the file; the others are classified. Decoding runs in a few threads (OpenCV and the
  quality metrics release the GIL); the model call is one per batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scin_pipeline.serve.batching import stack_cases
from scin_pipeline.serve.inputs import PredictionRequest, RequestError
from scin_pipeline.serve.limits import DEFAULT_MAX_PIXELS
from scin_pipeline.serve.model import ServedModel
from scin_pipeline.serve.prediction import TOP_K, calibration_info, decode_photo, prepare_inputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
NO_QUESTIONNAIRE = PredictionRequest(image=None)


class PathsError(ValueError):
    """A path on the command line that cannot be used (missing, or a folder without any image)."""


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``paths`` (module docstring); PathsError naming the first bad path."""
    found: dict[Path, Path] = {}
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not inside:
                raise PathsError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
            for file in inside:
                found.setdefault(file.resolve(), file)
        elif path.is_file():
            found.setdefault(path.resolve(), path)
        elif path.exists():
            raise PathsError(f"{path}: not a regular file or a folder")
        else:
            raise PathsError(f"{path}: no such file or folder")
    return sorted(found.values(), key=str)


@dataclass
class PreparedImage:
    """One file after decoding (or its refusal): what the CSV row and the model call need."""

    path: Path
    quality: dict | None = None
    images: np.ndarray | None = None  # (1, S, S, 3) uint8 when the model uses images
    cases: pd.DataFrame | None = None
    error: str = ""
    error_detail: str = ""


def prepare_file(served: ServedModel, path: Path, *, max_pixels: int, max_file_bytes: int) -> PreparedImage:
    """Read, decode (guarded), check quality and preprocess one file as the service does; an error row
    instead of an exception for a file that cannot be used."""
    try:
        size = path.stat().st_size
        if size > max_file_bytes:
            return PreparedImage(
                path, error="too_large", error_detail=f"{path}: {size:,} bytes, over the limit of {max_file_bytes:,}"
            )
        data = path.read_bytes()
    except OSError as exc:
        return PreparedImage(path, error="unreadable", error_detail=f"{path}: {exc.strerror or exc}")
    try:
        rgb = decode_photo(data, str(path), max_pixels)
    except RequestError as exc:
        return PreparedImage(path, error=exc.error, error_detail=exc.detail)
    quality, images, cases = prepare_inputs(served, NO_QUESTIONNAIRE, rgb)
    return PreparedImage(path, quality=quality, images=images, cases=cases)


def output_columns(classes: Sequence[str]) -> list[str]:
    top = [f"top{i}{suffix}" for i in range(1, TOP_K + 1) for suffix in ("", "_probability")]
    return [
        "path",
        "status",
        "error",
        "error_detail",
        "quality_verdict",
        "quality_issues",
        "width",
        "height",
        *top,
        *(f"probability_{c}" for c in classes),
        "calibrated",
        "temperature",
        "model_uri",
        "model_version",
        "notice",
    ]


def _row(served: ServedModel, prepared: PreparedImage, probabilities: np.ndarray | None) -> dict:
    calibration = calibration_info(served)
    row: dict[str, object] = {
        "path": str(prepared.path),
        "status": "error" if prepared.error else "ok",
        "error": prepared.error,
        "error_detail": prepared.error_detail,
        "calibrated": calibration["calibrated"],
        "temperature": calibration["temperature"],
        "model_uri": served.loaded_uri,
        "model_version": served.version,
        "notice": "NOT A DIAGNOSIS" + ("; model trained on SYNTHETIC images" if served.synthetic_data else ""),
    }
    if prepared.quality is not None:
        row.update(
            quality_verdict=prepared.quality["verdict"],
            quality_issues=";".join(issue["issue"] for issue in prepared.quality["issues"]),
            width=prepared.quality["width"],
            height=prepared.quality["height"],
        )
    if probabilities is not None:
        order = np.argsort(-probabilities, kind="stable")[:TOP_K]  # the service's ranking (prediction.answer)
        for rank, index in enumerate(order, start=1):
            row[f"top{rank}"] = served.classes[index]
            row[f"top{rank}_probability"] = float(probabilities[index])
        row.update({f"probability_{c}": float(p) for c, p in zip(served.classes, probabilities)})
    return row


def check_image_model(served: ServedModel) -> None:
    """ValueError unless ``served`` predicts from images (a metadata-only model would answer the same for
    every photo)."""
    if not served.uses_image:
        raise ValueError(
            f"{served.loaded_uri} is a {served.kind} model: it answers from the questionnaire only, not from "
            "images; pass --model with an image model"
        )


def classify_files(
    served: ServedModel,
    files: Sequence[Path],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    on_batch: Callable[[int], object] | None = None,
) -> Iterator[dict]:
    """One row per file (columns :func:`output_columns`), in ``files`` order, ``batch_size`` files per
    model call; ``on_batch(n)`` after each batch of ``n`` files."""
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be at least 1, got {batch_size} and {workers}")
    check_image_model(served)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scin-predict-decode") as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            prepared = list(
                pool.map(
                    lambda path: prepare_file(served, path, max_pixels=max_pixels, max_file_bytes=max_file_bytes),
                    chunk,
                )
            )
            usable = [p for p in prepared if not p.error]
            probabilities = iter(())
            if usable:
                images = np.concatenate([p.images for p in usable if p.images is not None])
                cases = stack_cases([p.cases for p in usable if p.cases is not None])
                probabilities = iter(served.predict_proba(images, cases))
            for item in prepared:
                yield _row(served, item, None if item.error else next(probabilities))
            if on_batch is not None:
                on_batch(len(chunk))

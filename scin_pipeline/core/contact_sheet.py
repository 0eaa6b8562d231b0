"""A contact sheet: a few thumbnails per exclusion reason, so a person can see what a rule removed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from scin_pipeline.core.imageio import decode_image

THUMB = 112
LABEL_WIDTH = 190
PAD = 6


def _thumbnail(path: str | None, size: int) -> Image.Image:
    """The image shrunk to fit a square, or a grey tile saying why it cannot be shown (decode failures
    are decoded by the same guarded decoder, so a bomb or a truncated file is never opened unsafely)."""
    tile = Image.new("RGB", (size, size), (60, 60, 60))
    decoded = decode_image(path) if path else None
    if decoded is None or decoded.rgb is None:
        text = "no file" if decoded is None else decoded.status.replace("_", "\n")
        ImageDraw.Draw(tile).multiline_text((8, size // 2 - 12), text, fill=(230, 230, 230))
        return tile
    image = Image.fromarray(np.ascontiguousarray(decoded.rgb))
    image.thumbnail((size, size))
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


def write_contact_sheet(
    examples: dict[str, list[str | None]], out_path: Path, *, title: str, per_row: int = 6, thumb: int = THUMB
) -> Path | None:
    """One row per reason (label at left), up to ``per_row`` thumbnails; None when there is nothing."""
    rows = [(reason, paths[:per_row]) for reason, paths in examples.items() if paths]
    if not rows:
        return None
    width = LABEL_WIDTH + per_row * (thumb + PAD) + PAD
    height = 30 + len(rows) * (thumb + PAD) + PAD
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, 8), title, fill=(0, 0, 0))
    for r, (reason, paths) in enumerate(rows):
        top = 30 + r * (thumb + PAD)
        draw.text((PAD, top + thumb // 2 - 6), reason, fill=(0, 0, 0))
        for c, path in enumerate(paths):
            sheet.paste(_thumbnail(path, thumb), (LABEL_WIDTH + c * (thumb + PAD), top))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, optimize=True)
    return out_path

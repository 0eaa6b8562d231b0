import io

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scin_pipeline.core import near_duplicates as nd


def _skin(seed: int, size=(450, 600), tone=(196, 160, 130)) -> np.ndarray:
    """A photo-like skin image: one tone, smooth mottling, fine texture, a few red marks, lighting."""
    rng = np.random.default_rng(seed)
    h, w = size
    field = np.zeros((h, w), np.float32)
    for cell, amp in ((60, 0.06), (15, 0.03), (3, 0.03)):
        grid = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
        field += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.array(tone, np.float32) * (1 + field)[..., None]
    for _ in range(12):
        centre = (int(rng.integers(20, w - 20)), int(rng.integers(20, h - 20)))
        axes = (int(rng.integers(4, 25)), int(rng.integers(4, 25)))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, (200, 90, 90), -1, cv2.LINE_AA)
    img *= np.linspace(0.85, 1.1, w, dtype=np.float32)[None, :, None]
    img += rng.normal(0, 2, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _reupload(rgb: np.ndarray) -> np.ndarray:
    """Cropped unevenly (6/1/3/7 %), downscaled to 0.6, 10 % brighter plus 6 levels, JPEG quality 70."""
    h, w = rgb.shape[:2]
    crop = rgb[round(0.03 * h) : h - round(0.07 * h), round(0.06 * w) : w - round(0.01 * w)]
    small = cv2.resize(crop, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    bright = np.clip(small.astype(np.float32) * 1.1 + 6, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(bright).save(buffer, "JPEG", quality=70)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _gray(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(rgb).convert("L")


def _descriptors(*images) -> tuple[np.ndarray, list[bytes]]:
    return nd.split_descriptors([nd.image_descriptor(_gray(im)) for im in images])


def test_reupload_is_found_and_unrelated_same_tone_image_is_not():
    source, other = _skin(1), _skin(2)
    copy = _reupload(source)
    hashes, keypoints = _descriptors(source, copy, other)
    found = nd.find_near_duplicates(hashes, keypoints)
    assert list(zip(found["i"], found["j"])) == [(0, 1)]
    assert found["keypoint_inliers"].iloc[0] >= 2 * nd.DEFAULT_MIN_INLIERS
    assert nd.keypoint_inliers(keypoints[0], keypoints[2]) < nd.DEFAULT_MIN_INLIERS
    assert nd.keypoint_inliers(keypoints[1], keypoints[2]) < nd.DEFAULT_MIN_INLIERS


def test_crop_hashes_of_a_crop_are_closer_crosswise_than_whole_frame():
    source = _skin(3)
    copy = _reupload(source)
    a, b = (np.array(nd.crop_phashes(_gray(im)), dtype=np.uint64) for im in (source, copy))
    crosswise = min(int(np.bitwise_count(x ^ y)) for x in a for y in b)
    assert crosswise <= nd.DEFAULT_MAX_CROP_PHASH_DISTANCE
    assert crosswise <= int(np.bitwise_count(a[0] ^ b[0]))


def test_candidate_pairs_are_exact_and_use_the_smallest_cross_distance():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=(50, 4), dtype=np.uint64)
    hashes[7, 2] = hashes[30, 0] ^ np.uint64(0b111)  # 3 bits apart, crosswise
    hashes[9, 1] = hashes[9, 3]  # one image's own crops never pair with themselves
    pairs = nd.candidate_pairs(hashes, 3)
    brute = {
        (i, j): min(int(np.bitwise_count(x ^ y)) for x in hashes[i] for y in hashes[j])
        for i in range(50)
        for j in range(i + 1, 50)
    }
    expected = {pair: d for pair, d in brute.items() if d <= 3}
    assert dict(zip(zip(pairs["i"], pairs["j"]), pairs["crop_phash_distance"])) == expected
    assert (7, 30) in expected


def test_descriptors_are_deterministic():
    image = _skin(4)
    assert nd.image_descriptor(_gray(image)) == nd.image_descriptor(_gray(image.copy()))
    _, keypoints = _descriptors(image, _reupload(image))
    assert nd.keypoint_inliers(keypoints[0], keypoints[1]) == nd.keypoint_inliers(keypoints[0], keypoints[1])
    blob = nd.image_descriptor(_gray(image))
    assert len(blob) <= 8 * len(nd.CROP_MARGINS) + nd.KEYPOINTS * 36


def test_featureless_image_has_no_keypoints_and_matches_nothing():
    flat = np.full((300, 400, 3), 128, np.uint8)
    assert nd.keypoint_descriptor(flat) == b""
    hashes, keypoints = _descriptors(flat, flat.copy())
    assert nd.find_near_duplicates(hashes, keypoints).empty  # identical, but nothing to verify on


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="uint8"):
        nd.keypoint_descriptor(np.zeros((50, 50), np.float32))
    with pytest.raises(ValueError, match="shape"):
        nd.crop_phashes(np.zeros((4, 50), np.uint8))
    with pytest.raises(ValueError, match="descriptor 1 is NoneType"):
        nd.split_descriptors([nd.image_descriptor(_gray(_skin(5))), None])
    with pytest.raises(ValueError, match="descriptor 0 is bytes of 3 bytes"):
        nd.split_descriptors([b"abc"])
    with pytest.raises(ValueError, match="multiple of 36"):
        nd.decode_keypoints(b"x" * 37)
    with pytest.raises(ValueError, match=r"\(n_images, k\)"):
        nd.candidate_pairs(np.zeros(5, np.uint64))
    with pytest.raises(ValueError, match="2 hash rows but 1 keypoint"):
        nd.find_near_duplicates(np.zeros((2, 4), np.uint64), [b""])


def test_pairs_frame_shape_when_nothing_is_found():
    pairs = nd.find_near_duplicates(np.zeros((0, 4), np.uint64), [])
    assert list(pairs.columns) == ["i", "j", "crop_phash_distance", "keypoint_inliers"]
    assert isinstance(pairs, pd.DataFrame) and pairs.empty

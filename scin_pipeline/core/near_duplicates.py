"""Near duplicates that survive re-uploads: crop-tolerant hash candidates, verified by keypoint geometry.

A re-upload is the same photo cropped by a few percent on each side (unevenly), downscaled, a little
brighter or darker, re-encoded as JPEG. Two stages, each a pure, deterministic function:

1. **Candidates** (:func:`candidate_pairs`): every image has the pHash of its whole frame and of three
   centred crops (5, 10 and 15 % off each side, :data:`CROP_MARGINS`), computed on the flat-fielded image
   (lighting divided out, :func:`crop_phashes`); two images are a candidate when *any* of the 4 x 4 cross
   pairs is within ``max_distance`` bits. A crop of one side moves the frame's content, while some centred
   crop of the other image frames nearly the same content, so the crosswise minimum stays small where the
   whole-frame distance does not. Exact: the hashes of all images and crops are searched together by
   :func:`scin_pipeline.core.hamming.find_near_duplicate_pairs`.
2. **Verification** (:func:`keypoint_inliers`): ORB keypoints of each image (:func:`keypoint_descriptor`,
   computed once per image by the quality stage and stored, ~5 KB) are matched, and an affine map is fitted
   with RANSAC; a candidate is a near duplicate when at least ``min_inliers`` matches agree with a map that
   a crop and a rescale can make (scale 0.7-1.45 per axis, shear and translation small). Unrelated images
   of the same skin and condition share colours and layout, which fools a hash, but not the positions of
   dozens of individual texture points.

``bench/near_duplicates.py`` measures both stages against the current rule on re-upload copies rendered
by its own generator; the thresholds (:data:`DEFAULT_MAX_CROP_PHASH_DISTANCE`,
:data:`DEFAULT_MIN_INLIERS`) are explained in :mod:`scin_pipeline.core.dedup`. No Dagster here.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from scin_pipeline.core.hamming import as_uint64_hashes, find_near_duplicate_pairs

# Centred crops hashed (fraction cut from each side); margin 0 is the whole frame.
CROP_MARGINS = (0.0, 0.05, 0.10, 0.15)
MIN_SIDE_PX = 8  # smaller images have no descriptor (the quality rule excludes them as too_small)
HASH_LONG_SIDE = 128
# The keypoint image: the grey working copy scaled to this long side, local contrast equalised (CLAHE), so
# that faint marks on deep or pale skin still give corners; ORB keeps the strongest KEYPOINTS of them.
KEYPOINT_LONG_SIDE = 320
KEYPOINTS = 150
_CLAHE_CLIP, _CLAHE_TILES = 3.0, (4, 4)
# Both images are scaled to the same long side, so only a crop's rescale (<= 1.19x) separates them: three
# pyramid levels (1.2x apart) cover it, at half the cost of ORB's default eight.
_ORB = dict(nfeatures=KEYPOINTS, nlevels=3, fastThreshold=5, edgeThreshold=15, patchSize=15)
# Matching and geometry (coordinates are divided by the keypoint image's long side).
MAX_DESCRIPTOR_DISTANCE = 64  # of 256 bits: looser matches are noise
RANSAC_THRESHOLD = 2.5 / KEYPOINT_LONG_SIDE  # 2.5 px of the keypoint image
RANSAC_ITERATIONS = 500
SCALE_RANGE = (0.7, 1.45)  # per-axis scale of the fitted map: crops of <= 15 % a side give 0.84-1.19
MAX_SHEAR = 0.15
MAX_TRANSLATION = 0.25

DEFAULT_MAX_CROP_PHASH_DISTANCE = 12
DEFAULT_MIN_INLIERS = 10

_COORD_SCALE = 65535
_BYTES_PER_KEYPOINT = 4 + 32  # x, y as uint16 fractions of the long side; the 256-bit ORB descriptor


def _gray_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("L"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
    if arr.ndim != 2 or min(arr.shape) < MIN_SIDE_PX:
        raise ValueError(
            f"image must be grey (h, w) or RGB (h, w, 3), at least {MIN_SIDE_PX} px a side; got shape {arr.shape}"
        )
    return np.ascontiguousarray(arr)


def _phash_bits(pixels: np.ndarray) -> np.uint64:
    """pHash of a 32 x 32 array: 2-D DCT, the 8 x 8 lowest frequencies above their median, MSB first."""
    import scipy.fft  # here, not at the top: importing the definitions must not pay scipy (cached after once)

    low = np.asarray(scipy.fft.dct(scipy.fft.dct(pixels, axis=0), axis=1))[:8, :8]
    return np.uint64(int.from_bytes(np.packbits((low > np.median(low)).ravel()).tobytes(), "big"))


def crop_phashes(gray) -> tuple[np.uint64, ...]:
    """pHashes of the flat-fielded image and of its centred crops (:data:`CROP_MARGINS`), 64 bits each.

    Flat-fielded: the grey image divided by its own blur (sigma = a tenth of the long side), so the hash
    encodes the marks and the texture, not the lighting gradient that every photo of skin has (on plain
    skin the usual pHash is little more than the direction of the light, and matches other photos lit the
    same way). ``gray``: the quality stage's grey working copy (PIL "L" image or uint8 array).
    """
    flat = _gray_array(gray)
    h, w = flat.shape
    scale = HASH_LONG_SIDE / max(h, w)  # every crop is hashed at 32 x 32: 128 px is plenty, and cheap
    if scale < 1:
        flat = cv2.resize(flat, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
    flat = flat.astype(np.float32)
    h, w = flat.shape
    flat /= cv2.GaussianBlur(flat, (0, 0), max(h, w) / 10) + np.float32(1.0)
    out = []
    for margin in CROP_MARGINS:
        dx, dy = round(w * margin), round(h * margin)
        crop = flat[dy : h - dy, dx : w - dx]
        out.append(_phash_bits(cv2.resize(crop, (32, 32), interpolation=cv2.INTER_AREA)))
    return tuple(out)


def keypoint_descriptor(image) -> bytes:
    """The image's ORB keypoints as bytes: n x (x, y as uint16 fractions of the long side) then n x 32 bytes.

    ``image``: uint8 grey or RGB array (or a PIL image), any size; scaled to a long side of
    :data:`KEYPOINT_LONG_SIDE` (down by area, up bilinear). Deterministic. A featureless image gives few or no
    keypoints.
    """
    gray = _gray_array(image)
    h, w = gray.shape
    scale = KEYPOINT_LONG_SIDE / max(h, w)
    if scale != 1:  # smaller images are enlarged: ORB's corners must be found at the same scale in both
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    gray = cv2.createCLAHE(clipLimit=_CLAHE_CLIP, tileGridSize=_CLAHE_TILES).apply(gray)
    keypoints, descriptors = cv2.ORB.create(**_ORB).detectAndCompute(gray, None)
    if not keypoints or descriptors is None:
        return b""
    long_side = float(max(gray.shape))
    xy = np.array([k.pt for k in keypoints], dtype=np.float64) / long_side
    coords = np.clip(np.round(xy * _COORD_SCALE), 0, _COORD_SCALE).astype("<u2")
    return coords.tobytes() + np.ascontiguousarray(descriptors, dtype=np.uint8).tobytes()


def decode_keypoints(blob: bytes | bytearray | memoryview | None) -> tuple[np.ndarray, np.ndarray]:
    """(n x 2 float32 coordinates, n x 32 uint8 descriptors) from :func:`keypoint_descriptor`'s bytes."""
    if blob is None or (isinstance(blob, float) and np.isnan(blob)):
        raise ValueError("keypoints missing: an image without a descriptor cannot be verified")
    raw = bytes(blob)
    if len(raw) % _BYTES_PER_KEYPOINT:
        raise ValueError(f"keypoint blob of {len(raw)} bytes is not a multiple of {_BYTES_PER_KEYPOINT}")
    n = len(raw) // _BYTES_PER_KEYPOINT
    coords = np.frombuffer(raw, dtype="<u2", count=2 * n).reshape(n, 2).astype(np.float32) / _COORD_SCALE
    descriptors = np.frombuffer(raw, dtype=np.uint8, offset=4 * n).reshape(n, 32)
    return coords, descriptors


_HASH_BYTES = 8 * len(CROP_MARGINS)


def image_descriptor(gray) -> bytes:
    """What the quality stage stores per image (column ``near_duplicate_descriptor``): the crop pHashes
    (:func:`crop_phashes`, 8 bytes each, big-endian) followed by the keypoints (:func:`keypoint_descriptor`).
    About 5 KB. ``gray``: the grey working copy (PIL "L" image or uint8 array)."""
    hashes = np.array(crop_phashes(gray), dtype=">u8").tobytes()
    return hashes + keypoint_descriptor(np.asarray(gray) if isinstance(gray, Image.Image) else gray)


def split_descriptors(descriptors: Sequence) -> tuple[np.ndarray, list[bytes]]:
    """(n x len(CROP_MARGINS) uint64 crop pHashes, n keypoint blobs) of :func:`image_descriptor` values.

    A missing or short value is an error that names its position: an image without a descriptor (it did
    not decode, or was assessed before descriptors existed) cannot be searched.
    """
    values = list(descriptors)
    hashes = np.zeros((len(values), len(CROP_MARGINS)), dtype=np.uint64)
    keypoints: list[bytes] = []
    for k, value in enumerate(values):
        if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) < _HASH_BYTES:
            raise ValueError(
                f"near-duplicate descriptor {k} is {type(value).__name__}"
                + (f" of {len(value)} bytes" if isinstance(value, (bytes, bytearray, memoryview)) else "")
                + f", expected bytes of at least {_HASH_BYTES} (re-run the quality stage)"
            )
        raw = bytes(value)
        hashes[k] = np.frombuffer(raw, dtype=">u8", count=len(CROP_MARGINS))
        keypoints.append(raw[_HASH_BYTES:])
    return hashes, keypoints


_MATCHER = None


def _matcher():
    global _MATCHER
    if _MATCHER is None:
        _MATCHER = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
    return _MATCHER


def _plausible(warp: np.ndarray) -> bool:
    """A map a crop plus a rescale can make: per-axis scale in range, little shear, small translation."""
    sx, sy = float(np.hypot(warp[0, 0], warp[1, 0])), float(np.hypot(warp[0, 1], warp[1, 1]))
    lo, hi = SCALE_RANGE
    return (
        lo <= sx <= hi
        and lo <= sy <= hi
        and abs(warp[0, 1]) <= MAX_SHEAR
        and abs(warp[1, 0]) <= MAX_SHEAR
        and abs(warp[0, 2]) <= MAX_TRANSLATION
        and abs(warp[1, 2]) <= MAX_TRANSLATION
    )


def keypoint_inliers(a, b) -> int:
    """How many keypoint matches of two images agree with one plausible crop-and-rescale map (0 if none).

    ``a``, ``b``: blobs of :func:`keypoint_descriptor` or their :func:`decode_keypoints` tuples. Mutual
    nearest neighbours in Hamming distance (<= :data:`MAX_DESCRIPTOR_DISTANCE`), then a RANSAC affine fit
    (OpenCV's, with its fixed seed: deterministic).
    """
    (pa, da) = decode_keypoints(a) if isinstance(a, (bytes, bytearray, memoryview)) else a
    (pb, db) = decode_keypoints(b) if isinstance(b, (bytes, bytearray, memoryview)) else b
    if len(da) < 3 or len(db) < 3:
        return 0
    matches = [m for m in _matcher().match(da, db) if m.distance <= MAX_DESCRIPTOR_DISTANCE]
    if len(matches) < 3:
        return 0
    src = pa[[m.queryIdx for m in matches]]
    dst = pb[[m.trainIdx for m in matches]]
    warp, inliers = cv2.estimateAffine2D(
        src,
        dst,
        method=cv2.RANSAC,
        ransacReprojThreshold=RANSAC_THRESHOLD,
        maxIters=RANSAC_ITERATIONS,
        confidence=0.995,
        refineIters=0,
    )
    if warp is None or inliers is None or not _plausible(warp):
        return 0
    return int(inliers.sum())


def candidate_pairs(hashes, max_distance: int = DEFAULT_MAX_CROP_PHASH_DISTANCE) -> pd.DataFrame:
    """Pairs i < j of images with any cross pair of their hashes within ``max_distance`` bits.

    ``hashes``: (n_images, k) array-like of 64-bit hashes per image (the whole-frame pHash and the crop
    pHashes), uint64 or int64 bit patterns. Returns columns i, j (int64) and ``crop_phash_distance`` (int16,
    the smallest of the k x k distances), sorted by (i, j). Exact: one Hamming search over all n*k hashes.
    """
    table = np.asarray(hashes)
    if table.ndim != 2:
        raise ValueError(f"hashes must be (n_images, k), got shape {table.shape}")
    n, k = table.shape
    flat = as_uint64_hashes(table.T.reshape(-1), "hashes")  # crop-major: image of flat index f is f % n
    found = find_near_duplicate_pairs(flat, int(max_distance))
    i, j = found["i"].to_numpy() % n, found["j"].to_numpy() % n
    keep = i != j
    pairs = pd.DataFrame(
        {"i": np.minimum(i, j)[keep], "j": np.maximum(i, j)[keep], "crop_phash_distance": found["distance"][keep]}
    )
    pairs = pairs.groupby(["i", "j"], sort=True)["crop_phash_distance"].min().reset_index()
    return pairs.astype({"i": "int64", "j": "int64", "crop_phash_distance": "int16"})


def verify_pairs(keypoints: Sequence, pairs: pd.DataFrame) -> np.ndarray:
    """:func:`keypoint_inliers` of every (i, j) row of ``pairs`` (int32), keypoint blobs indexed by i and j."""
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def decoded(index: int):
        if index not in cache:
            cache[index] = decode_keypoints(keypoints[index])
        return cache[index]

    i, j = pairs["i"].to_numpy(), pairs["j"].to_numpy()
    return np.array([keypoint_inliers(decoded(int(a)), decoded(int(b))) for a, b in zip(i, j)], dtype=np.int32)


def find_near_duplicates(
    hashes,
    keypoints: Sequence,
    *,
    max_crop_phash_distance: int = DEFAULT_MAX_CROP_PHASH_DISTANCE,
    min_inliers: int = DEFAULT_MIN_INLIERS,
) -> pd.DataFrame:
    """Near-duplicate pairs: candidates of :func:`candidate_pairs` with at least ``min_inliers`` inliers.

    Returns columns i, j, crop_phash_distance, keypoint_inliers, sorted by (i, j).
    """
    if len(keypoints) != len(np.asarray(hashes)):
        raise ValueError(f"{len(np.asarray(hashes))} hash rows but {len(keypoints)} keypoint blobs")
    pairs = candidate_pairs(hashes, max_crop_phash_distance)
    inliers = verify_pairs(keypoints, pairs)
    pairs = pairs.assign(keypoint_inliers=inliers)
    return pairs[inliers >= int(min_inliers)].reset_index(drop=True)

"""Near-duplicate images over 64-bit perceptual hashes, and the clusters a leakage-free split must respect.

Two layers, each a pure, deterministic function:

1. **Near-duplicate pairs**: by default (where the quality stage stored descriptors) crop-tolerant pHash
   candidates verified by ORB keypoint geometry (:mod:`scin_pipeline.core.near_duplicates`: finds re-uploads,
   i.e. crops, rescaling, brightness, JPEG); otherwise the earlier rule (:func:`near_duplicate_pairs`):
   pHash AND dHash within their thresholds. Both search with the exact Hamming search of
   :mod:`scin_pipeline.core.hamming`.
2. **Clusters** (:func:`build_dedup_clusters`): images linked by exact file reuse (one ``image_id``
   referenced by several cases) or by a near-duplicate pair are one cluster, typed by what it means for
   leakage; :func:`case_groups` lifts clusters to groups of cases that a split must keep on one side.

How well this finds the near-duplicates a synthetic mirror planted is measured in
:mod:`scin_pipeline.core.planted`.

Thresholds
----------
Keypoints method: crop pHash <= 12 (any of the 4 x 4 crop pairs), then >= 10 ORB inliers; see the comment
above :data:`DEFAULT_MAX_CROP_PHASH_DISTANCE`. Hashes method: pHash <= 10 AND dHash <= 10, each candidate
verified on a 256-bit dHash (<= 56); its measurements are in ``docs/results/dedup_thresholds.md``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scin_pipeline.core import near_duplicates
from scin_pipeline.core.hamming import as_uint64_hashes, find_near_duplicate_pairs

# Defaults: a candidate pair has pHash <= 10 AND dHash <= 10 bits apart (of 64), and is kept when its 256-bit
# dHash distance is <= 56 (of 256). Measured on synthetic mirrors by `bench/dedup_search.py --thresholds`; the
# measurements and how the defaults moved: docs/results/dedup_thresholds.md. Recheck on real hashes.
DEFAULT_MAX_PHASH_DISTANCE = 10
DEFAULT_MAX_DHASH_DISTANCE = 10
DEFAULT_MAX_DHASH256_DISTANCE = 56

# The keypoints method (the default where the quality stage stored descriptors), measured 2026-12 by
# bench/near_duplicates.py (its own generator: 300 sources x 6 re-upload copies - uneven crop 0-8 % a side,
# downscale 0.5-1.0, gain +-15 % with offset, JPEG 60-95, each alone and combined - against same-condition,
# same-tone photos and plain skin; seeds 1 and 2, 2,550 images each):
#   stage 1, crop pHash (4 x 4 crop pairs): source-copy pairs p99 12, max 16-18; unrelated min 4-6, 1,411 and
#     2,096 of 3.2 M unrelated pairs within 12. <= 12: 7 and 9 of 1,800 true pairs missed; a looser radius
#     buys little recall for many more candidates to verify (the cost at scale).
#   stage 2, ORB inliers on those candidates: true p1 22 / 13, min 8 / 0; unrelated max 0 (the plausible-map
#     test rejects them all). At 10,000 images (1,000 copies): 23.5 k candidates, unrelated max 6 inliers,
#     so >= 10 keeps a margin of 4. Result: recall 0.995 / 0.992, precision 1.000 on both seeds (pHash AND
#     dHash: recall 0.67 / 0.65). Plain skin without marks is the weak case (110 of 167 copies at 10 k).
DESCRIPTOR_COLUMN = "near_duplicate_descriptor"
DEFAULT_MAX_CROP_PHASH_DISTANCE = near_duplicates.DEFAULT_MAX_CROP_PHASH_DISTANCE
DEFAULT_MIN_KEYPOINT_INLIERS = near_duplicates.DEFAULT_MIN_INLIERS


def near_duplicate_pairs(phash: np.ndarray, dhash: np.ndarray, max_phash: int, max_dhash: int) -> pd.DataFrame:
    """Pairs i < j whose pHash AND dHash are both within their thresholds.

    Searches on pHash and filters on dHash: requiring both cuts the false positives of one hash on images
    that merely look alike (similar skin, similar framing). Columns: i, j, phash_distance, dhash_distance.
    """
    phash = as_uint64_hashes(phash, "phash")
    dhash = as_uint64_hashes(dhash, "dhash")
    if phash.size != dhash.size:
        raise ValueError(f"phash and dhash differ in length ({phash.size} vs {dhash.size})")
    by_phash = find_near_duplicate_pairs(phash, max_phash)
    i, j = by_phash["i"].to_numpy(), by_phash["j"].to_numpy()
    dhash_distance = np.bitwise_count(dhash[i] ^ dhash[j]).astype(np.int16)
    keep = dhash_distance <= int(max_dhash)
    return pd.DataFrame(
        {
            "i": i[keep],
            "j": j[keep],
            "phash_distance": by_phash["distance"].to_numpy()[keep],
            "dhash_distance": dhash_distance[keep],
        }
    ).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------
# Clusters
# --------------------------------------------------------------------------------------------------------


def cluster_labels(n: int, pairs) -> np.ndarray:
    """Connected components of nodes 0..n-1 linked by ``pairs`` (k x 2 integer array, or a DataFrame with
    columns i and j): each node's label is the smallest node index of its component.

    scipy's connected_components is the union-find here (a well-kept library, compiled); labelling by the
    smallest member makes the labels independent of its traversal order and of the order of the pairs.
    """
    n = int(n)
    if isinstance(pairs, pd.DataFrame):
        pairs = pairs[["i", "j"]].to_numpy()
    edges = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if n == 0:
        if edges.size:
            raise ValueError("pairs given for n = 0 nodes")
        return np.zeros(0, dtype=np.int64)
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"pairs reference nodes outside 0..{n - 1}")
    # scipy here, not at the top: the definitions import this module for its defaults and must stay light.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    _, first_member = np.unique(component, return_index=True)  # first occurrence = smallest node index
    return first_member[component].astype(np.int64)


# Cluster kinds, from least to most severe for leakage; a cluster takes the most severe that applies.
# exact_reuse ranks first: the very same pixels under two cases are the strongest leak a split can suffer
# (a model can memorise the file). A cross-case near-duplicate is almost as strong and is invisible in the
# metadata. Both force their cases into one group; the kind says what a reviewer will find in the cluster
# (the pairs table lists every near-duplicate link, so nothing is hidden by the precedence).
SINGLETON = "singleton"
SAME_CASE_MULTI_ANGLE = "same_case_multi_angle"
CROSS_CASE_NEAR_DUPLICATE = "cross_case_near_duplicate"
EXACT_REUSE = "exact_reuse"
CLUSTER_KIND_PRECEDENCE = (SINGLETON, SAME_CASE_MULTI_ANGLE, CROSS_CASE_NEAR_DUPLICATE, EXACT_REUSE)

CLUSTER_COLUMNS = ("image_id", "case_id", "cluster_id", "cluster_size", "cluster_n_cases", "cluster_kind")
PAIR_TABLE_COLUMNS = ("image_id_a", "image_id_b", "phash_distance", "dhash_distance", "same_case", "kind", "cluster_id")


def _id_strings(values: pd.Series, column: str) -> pd.Series:
    if values.isna().any():
        raise ValueError(f"{column} has {int(values.isna().sum())} missing values")
    return values.astype(str)


def hex_hashes_to_bits(values: pd.Series) -> np.ndarray:
    """Hex hash strings (all the same length) as an (n, bytes) uint8 array, for vectorised popcounts."""
    texts = values.astype(str).to_numpy()
    lengths = {len(t) for t in texts}
    if len(lengths) > 1 or any(t in ("None", "nan", "<NA>") for t in texts):
        raise ValueError("fine hashes must be present and of one length for every referenced image")
    width = lengths.pop() // 2 if texts.size else 0
    return np.frombuffer(bytes.fromhex("".join(texts)), dtype=np.uint8).reshape(len(texts), width)


def build_dedup_clusters(
    images: pd.DataFrame,
    hashes: pd.DataFrame,
    *,
    max_phash_distance: int = DEFAULT_MAX_PHASH_DISTANCE,
    max_dhash_distance: int = DEFAULT_MAX_DHASH_DISTANCE,
    max_dhash256_distance: int | None = DEFAULT_MAX_DHASH256_DISTANCE,
    method: str = "auto",
    max_crop_phash_distance: int = DEFAULT_MAX_CROP_PHASH_DISTANCE,
    min_keypoint_inliers: int = DEFAULT_MIN_KEYPOINT_INLIERS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Duplicate clusters over image references, and the near-duplicate pairs that link them.

    ``method``: ``"keypoints"`` (the default wherever ``hashes`` has the ``near_duplicate_descriptor`` column
    the quality stage writes: ``"auto"``) finds candidates on the crop pHashes within
    ``max_crop_phash_distance`` and keeps those with at least ``min_keypoint_inliers`` ORB inliers
    (:mod:`scin_pipeline.core.near_duplicates`; survives crops, rescaling, brightness and JPEG).
    ``"hashes"`` (``"auto"`` without descriptors) is the earlier rule: pHash AND dHash within their
    thresholds, each candidate verified on the 256-bit ``dhash256`` column (hex) where present and
    ``max_dhash256_distance`` is set.

    ``images``: one row per image reference with ``image_id`` and ``case_id`` (only references whose file
    decoded and has hashes). ``hashes``: one row per distinct file with ``image_id``, ``phash``, ``dhash``
    (64-bit, as the quality stage writes them). Files hashed but not referenced in ``images`` are ignored,
    so that they cannot bridge two clusters.

    Images are linked (a) by exact reuse: one image_id referenced by several cases is one node shared by
    those cases, and (b) by near-duplicate pairs (``method``). Clusters are the connected components.

    Returns ``(clusters, pairs)``:

    - clusters: one row per distinct (image_id, case_id) reference: ``cluster_id`` (the smallest image_id of
      the cluster, in string order: a member, independent of row order and of the run), ``cluster_size``
      (distinct images), ``cluster_n_cases``, ``cluster_kind`` (see ``CLUSTER_KIND_PRECEDENCE``):
      ``exact_reuse`` (a file of the cluster is referenced by several cases) over
      ``cross_case_near_duplicate`` (a near-duplicate pair between images that share no case) over
      ``same_case_multi_angle`` (several images, every link within one case) over ``singleton``.
      Sorted by (cluster_id, image_id, case_id).
    - pairs: one row per near-duplicate pair of distinct files, ``image_id_a < image_id_b``, their
      distances (pHash and dHash always; ``crop_phash_distance`` and ``keypoint_inliers`` with the keypoints
      method, ``dhash256_distance`` with the verified hashes method), ``same_case`` (the two files share at
      least one referencing case), ``kind`` (``same_case_multi_angle`` or ``cross_case_near_duplicate``) and
      ``cluster_id``.

    Pass the images a split will use (after the quality filter): blown-out or black frames share hashes
    (on three synthetic mirrors, 1,715 pairs of such frames are near-identical under any threshold) and
    would join unrelated cases into one group.
    """
    for frame, name, needed in (
        (images, "images", ("image_id", "case_id")),
        (hashes, "hashes", ("image_id", "phash", "dhash")),
    ):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
    refs = pd.DataFrame(
        {
            "image_id": _id_strings(images["image_id"], "images.image_id"),
            "case_id": _id_strings(images["case_id"], "images.case_id"),
        }
    ).drop_duplicates()
    image_ids = np.sort(refs["image_id"].unique()).astype(object)
    hash_ids = _id_strings(hashes["image_id"], "hashes.image_id")
    if hash_ids.duplicated().any():
        raise ValueError(f"hashes has duplicate image_id values, e.g. {hash_ids[hash_ids.duplicated()].iloc[0]}")
    hash_rows = pd.Series(np.arange(len(hash_ids)), index=hash_ids.to_numpy())
    unhashed = [i for i in image_ids if i not in hash_rows.index]
    if unhashed:
        raise ValueError(
            f"{len(unhashed)} referenced images have no hashes (e.g. {unhashed[:3]}); pass only "
            "references whose file decoded"
        )
    rows = hash_rows.loc[image_ids].to_numpy()
    phash = as_uint64_hashes(hashes["phash"].iloc[rows], "hashes.phash")
    dhash = as_uint64_hashes(hashes["dhash"].iloc[rows], "hashes.dhash")

    if method == "auto":
        method = "keypoints" if DESCRIPTOR_COLUMN in hashes.columns else "hashes"
    if method == "keypoints":
        if DESCRIPTOR_COLUMN not in hashes.columns:
            raise ValueError(f"method 'keypoints' needs the {DESCRIPTOR_COLUMN} column (quality stage)")
        crop_hashes, keypoints = near_duplicates.split_descriptors(hashes[DESCRIPTOR_COLUMN].iloc[rows])
        near = near_duplicates.find_near_duplicates(
            crop_hashes,
            keypoints,
            max_crop_phash_distance=max_crop_phash_distance,
            min_inliers=min_keypoint_inliers,
        )
        i, j = near["i"].to_numpy(), near["j"].to_numpy()
        near = near.assign(
            phash_distance=np.bitwise_count(phash[i] ^ phash[j]).astype(np.int16),
            dhash_distance=np.bitwise_count(dhash[i] ^ dhash[j]).astype(np.int16),
        )
    elif method == "hashes":
        near = near_duplicate_pairs(phash, dhash, max_phash_distance, max_dhash_distance)
    else:
        raise ValueError(f"method must be 'auto', 'keypoints' or 'hashes', got {method!r}")
    if method == "hashes" and max_dhash256_distance is not None and "dhash256" in hashes.columns:
        fine = hex_hashes_to_bits(hashes["dhash256"].iloc[rows])
        distance = np.bitwise_count(fine[near["i"].to_numpy()] ^ fine[near["j"].to_numpy()]).sum(axis=1)
        near = near.assign(dhash256_distance=distance)[distance <= max_dhash256_distance].reset_index(drop=True)
    n_images = len(image_ids)
    labels = cluster_labels(n_images, near[["i", "j"]].to_numpy())
    cluster_ids = image_ids[labels]  # image_ids are sorted: the smallest index is the smallest id

    image_index = pd.Series(np.arange(n_images), index=image_ids)
    ref_image = image_index.loc[refs["image_id"].to_numpy()].to_numpy()
    refs = refs.assign(_image=ref_image, cluster_id=cluster_ids[labels[ref_image]])

    # Which near pairs share a referencing case (both files belong to one case: multi-angle shots).
    pair_ends = pd.DataFrame({"_pair": np.arange(len(near)), "_a": near["i"].to_numpy(), "_b": near["j"].to_numpy()})
    cases_of_a = pair_ends.merge(refs[["_image", "case_id"]], left_on="_a", right_on="_image")[["_pair", "case_id"]]
    cases_of_b = pair_ends.merge(refs[["_image", "case_id"]], left_on="_b", right_on="_image")[["_pair", "case_id"]]
    shared_case_pairs = cases_of_a.merge(cases_of_b, on=["_pair", "case_id"])["_pair"].unique()
    same_case = np.zeros(len(near), dtype=bool)
    same_case[shared_case_pairs] = True

    n_cases_per_image = refs.groupby("_image")["case_id"].nunique().reindex(range(n_images), fill_value=0)
    cluster_of_image = pd.Series(cluster_ids, index=range(n_images))
    per_cluster = pd.DataFrame(
        {
            "cluster_size": cluster_of_image.value_counts(),
            "cluster_n_cases": refs.groupby("cluster_id")["case_id"].nunique(),
        }
    )
    reused = set(cluster_of_image[n_cases_per_image.to_numpy() > 1])
    cross_case = set(cluster_ids[labels[near["i"].to_numpy()[~same_case]]])
    kind = np.where(per_cluster["cluster_size"] > 1, SAME_CASE_MULTI_ANGLE, SINGLETON).astype(object)
    kind[per_cluster.index.isin(cross_case)] = CROSS_CASE_NEAR_DUPLICATE
    kind[per_cluster.index.isin(reused)] = EXACT_REUSE
    per_cluster["cluster_kind"] = kind

    clusters = refs.drop(columns="_image").join(per_cluster, on="cluster_id")
    clusters = clusters.sort_values(["cluster_id", "image_id", "case_id"], kind="stable").reset_index(drop=True)
    clusters["cluster_size"] = clusters["cluster_size"].astype(np.int64)
    clusters["cluster_n_cases"] = clusters["cluster_n_cases"].astype(np.int64)
    clusters = clusters[list(CLUSTER_COLUMNS)]

    pairs = pd.DataFrame(
        {
            "image_id_a": image_ids[near["i"].to_numpy()],
            "image_id_b": image_ids[near["j"].to_numpy()],
            "phash_distance": near["phash_distance"].to_numpy(),
            "dhash_distance": near["dhash_distance"].to_numpy(),
            "same_case": same_case,
            "kind": np.where(same_case, SAME_CASE_MULTI_ANGLE, CROSS_CASE_NEAR_DUPLICATE),
            "cluster_id": cluster_ids[labels[near["i"].to_numpy()]],
        },
        columns=list(PAIR_TABLE_COLUMNS),
    )
    for col in ("crop_phash_distance", "keypoint_inliers", "dhash256_distance"):
        if col in near:
            pairs[col] = near[col].to_numpy()
    for col in ("image_id_a", "image_id_b", "kind", "cluster_id"):
        pairs[col] = pairs[col].astype(str)
    return clusters, pairs.sort_values(["image_id_a", "image_id_b"], kind="stable").reset_index(drop=True)


def case_groups(clusters: pd.DataFrame) -> pd.Series:
    """case_id -> group id: connected components of cases linked by any shared cluster.

    A split must keep each group on one side. The group id is the smallest case_id of the group (string
    order), so it does not depend on row order. Index ``case_id`` (sorted), name ``case_group``.
    """
    missing = [c for c in ("case_id", "cluster_id") if c not in clusters.columns]
    if missing:
        raise ValueError(f"clusters lacks columns {missing}")
    case_ids = _id_strings(clusters["case_id"], "clusters.case_id")
    cluster_ids = _id_strings(clusters["cluster_id"], "clusters.cluster_id")
    cases = np.sort(case_ids.unique()).astype(object)
    cluster_nodes = np.sort(cluster_ids.unique()).astype(object)
    # Nodes: the cases first, then the clusters; every component holds a case, so its smallest node index
    # is its smallest case_id.
    case_node = pd.Series(np.arange(len(cases)), index=cases).loc[case_ids.to_numpy()].to_numpy()
    cluster_node = (
        len(cases)
        + pd.Series(np.arange(len(cluster_nodes)), index=cluster_nodes).loc[cluster_ids.to_numpy()].to_numpy()
    )
    labels = cluster_labels(len(cases) + len(cluster_nodes), np.column_stack([case_node, cluster_node]))
    groups = pd.Series(cases[labels[: len(cases)]], index=pd.Index(cases, name="case_id"), name="case_group")
    return groups.astype(str)

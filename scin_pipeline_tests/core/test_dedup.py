"""Tests for core.dedup: near-duplicate pairs (pHash AND dHash), clusters and their kinds, case groups, and
how well they find the near duplicates a synthetic mirror planted."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scin_pipeline.core import dedup, near_duplicates
from scin_pipeline.core.dedup import (
    CROSS_CASE_NEAR_DUPLICATE,
    EXACT_REUSE,
    SAME_CASE_MULTI_ANGLE,
    SINGLETON,
    build_dedup_clusters,
    case_groups,
    cluster_labels,
    near_duplicate_pairs,
)
from scin_pipeline.core.planted import planted_near_duplicate_scores
from scin_pipeline_tests.core.hashes import flip_bits, random_hashes


def test_near_duplicate_pairs_require_both_hashes():
    rng = np.random.default_rng(3)
    phash = random_hashes(rng, 4)
    dhash = random_hashes(rng, 4)
    phash[1] = flip_bits(rng, phash[0], 2)
    dhash[1] = flip_bits(rng, dhash[0], 3)  # 0-1: both close
    phash[3] = flip_bits(rng, phash[2], 1)
    dhash[3] = flip_bits(rng, dhash[2], 20)  # 2-3: pHash close, dHash far
    found = near_duplicate_pairs(phash, dhash, max_phash=4, max_dhash=6)
    assert found[["i", "j", "phash_distance", "dhash_distance"]].values.tolist() == [[0, 1, 2, 3]]


# --------------------------------------------------------------------------------------------------------
# Connected components
# --------------------------------------------------------------------------------------------------------


def test_cluster_labels_are_components_labelled_by_smallest_member():
    labels = cluster_labels(7, np.array([[5, 3], [3, 1], [6, 4]]))
    assert labels.tolist() == [0, 1, 2, 1, 4, 1, 4]
    shuffled = cluster_labels(7, np.array([[4, 6], [1, 3], [3, 5]]))
    assert shuffled.tolist() == labels.tolist()
    assert cluster_labels(3, np.zeros((0, 2), int)).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        cluster_labels(3, np.array([[0, 3]]))


# --------------------------------------------------------------------------------------------------------
# Clusters on a hand-made example
# --------------------------------------------------------------------------------------------------------


def hand_made_example():
    """Images and hashes (pHash and dHash equal, for legibility) with known relations.

    - 100 in cases A and B: exact reuse.
    - 110, 111 in case C, 3 bits apart: same-case multi-angle.
    - 120 (case D) and 121 (case E), 4 bits apart: cross-case near-duplicate.
    - 130 (F) - 131 (G) - 132 (H): a chain, 5 bits per step, 10 bits end to end (over the threshold).
    - 140 (case I) alone; 141 (case J) a far image; 150 (case K) near 100 -> the exact-reuse cluster also
      holds a cross-case near duplicate.
    """
    rng = np.random.default_rng(11)
    base = {k: random_hashes(rng, 1)[0] for k in (100, 110, 120, 130, 140, 141)}
    chain_mid = flip_bits(rng, base[130], 5)
    # The chain's end: 5 bits from the middle and 10 from the start (5 bits not flipped before).
    flipped = int(chain_mid ^ base[130])
    free = [b for b in range(64) if not (flipped >> b) & 1]
    chain_end = np.uint64(int(chain_mid) ^ sum(1 << b for b in free[:5]))
    hashes = {
        100: base[100],
        110: base[110],
        111: flip_bits(rng, base[110], 3),
        120: base[120],
        121: flip_bits(rng, base[120], 4),
        130: base[130],
        131: chain_mid,
        132: chain_end,
        140: base[140],
        141: base[141],
        150: flip_bits(rng, base[100], 2),
    }
    refs = [
        (100, "A"),
        (100, "B"),
        (110, "C"),
        (111, "C"),
        (120, "D"),
        (121, "E"),
        (130, "F"),
        (131, "G"),
        (132, "H"),
        (140, "I"),
        (141, "J"),
        (150, "K"),
    ]
    images = pd.DataFrame(
        {"image_id": [str(i) for i, _ in refs], "case_id": [c for _, c in refs], "position": range(len(refs))}
    )
    hash_table = pd.DataFrame(
        {
            "image_id": [str(k) for k in hashes],
            "phash": np.array(list(hashes.values()), dtype=np.uint64),
            "dhash": np.array(list(hashes.values()), dtype=np.uint64),
        }
    )
    return images, hash_table


def test_cluster_kinds_on_a_hand_made_example():
    images, hashes = hand_made_example()
    clusters, pairs = build_dedup_clusters(images, hashes, max_phash_distance=6, max_dhash_distance=6)
    assert list(clusters.columns) == list(dedup.CLUSTER_COLUMNS)
    assert len(clusters) == len(images)  # one row per reference
    by_ref = clusters.set_index(["image_id", "case_id"])

    def cluster_of(image_id, case_id):
        return by_ref.loc[(image_id, case_id)]

    reuse = cluster_of("100", "A")
    assert cluster_of("100", "B")["cluster_id"] == reuse["cluster_id"] == cluster_of("150", "K")["cluster_id"]
    assert reuse["cluster_kind"] == EXACT_REUSE  # exact reuse outranks its cross-case near duplicate
    assert (reuse["cluster_size"], reuse["cluster_n_cases"]) == (2, 3)

    multi = cluster_of("110", "C")
    assert multi["cluster_id"] == cluster_of("111", "C")["cluster_id"] == "110"
    assert multi["cluster_kind"] == SAME_CASE_MULTI_ANGLE
    assert (multi["cluster_size"], multi["cluster_n_cases"]) == (2, 1)

    cross = cluster_of("121", "E")
    assert cross["cluster_id"] == cluster_of("120", "D")["cluster_id"] == "120"
    assert cross["cluster_kind"] == CROSS_CASE_NEAR_DUPLICATE

    chain = clusters[clusters["case_id"].isin(["F", "G", "H"])]
    assert chain["cluster_id"].nunique() == 1  # 130 and 132 are 10 bits apart: linked through 131
    assert (chain["cluster_kind"] == CROSS_CASE_NEAR_DUPLICATE).all()
    assert (chain["cluster_size"] == 3).all() and (chain["cluster_n_cases"] == 3).all()

    for image_id, case_id in (("140", "I"), ("141", "J")):
        alone = cluster_of(image_id, case_id)
        assert alone["cluster_kind"] == SINGLETON and alone["cluster_id"] == image_id
        assert (alone["cluster_size"], alone["cluster_n_cases"]) == (1, 1)

    pair_rows = {
        (a, b): (same, kind)
        for a, b, same, kind in pairs[["image_id_a", "image_id_b", "same_case", "kind"]].itertuples(index=False)
    }
    assert pair_rows == {
        ("100", "150"): (False, CROSS_CASE_NEAR_DUPLICATE),
        ("110", "111"): (True, SAME_CASE_MULTI_ANGLE),
        ("120", "121"): (False, CROSS_CASE_NEAR_DUPLICATE),
        ("130", "131"): (False, CROSS_CASE_NEAR_DUPLICATE),
        ("131", "132"): (False, CROSS_CASE_NEAR_DUPLICATE),
    }
    assert pairs.set_index(["image_id_a", "image_id_b"]).loc[("120", "121"), "phash_distance"] == 4


def test_clusters_do_not_depend_on_row_order():
    images, hashes = hand_made_example()
    expected = build_dedup_clusters(images, hashes, max_phash_distance=6, max_dhash_distance=6)
    for seed in range(3):
        shuffled = build_dedup_clusters(
            images.sample(frac=1, random_state=seed),
            hashes.sample(frac=1, random_state=seed + 10),
            max_phash_distance=6,
            max_dhash_distance=6,
        )
        pd.testing.assert_frame_equal(shuffled[0], expected[0])
        pd.testing.assert_frame_equal(shuffled[1], expected[1])


def test_dhash_threshold_splits_a_pair_that_phash_alone_would_join():
    images, hashes = hand_made_example()
    far_dhash = hashes.copy()
    far_dhash.loc[far_dhash["image_id"] == "121", "dhash"] = ~far_dhash.loc[
        far_dhash["image_id"] == "120", "dhash"
    ].to_numpy()
    clusters, _ = build_dedup_clusters(images, far_dhash, max_phash_distance=6, max_dhash_distance=6)
    assert clusters.set_index("image_id").loc["121", "cluster_kind"] == SINGLETON


def test_unreferenced_hashes_cannot_bridge_clusters_and_missing_hashes_are_refused():
    images, hashes = hand_made_example()
    # An unreferenced file halfway between 140 and 141 would join them if it took part.
    a = int(hashes.set_index("image_id").loc["140", "phash"])
    b = int(hashes.set_index("image_id").loc["141", "phash"])
    diff = [bit for bit in range(64) if ((a ^ b) >> bit) & 1]
    middle = np.uint64(a ^ sum(1 << bit for bit in diff[: len(diff) // 2]))
    bridged = pd.concat(
        [hashes, pd.DataFrame({"image_id": ["999"], "phash": [middle], "dhash": [middle]})], ignore_index=True
    )
    clusters, _ = build_dedup_clusters(images, bridged, max_phash_distance=64, max_dhash_distance=64)
    assert "999" not in set(clusters["image_id"])
    with pytest.raises(ValueError, match="no hashes"):
        build_dedup_clusters(images, hashes[hashes["image_id"] != "141"])


def test_case_groups_join_cases_linked_through_a_chain_of_clusters():
    clusters = pd.DataFrame(
        {
            "image_id": ["1", "1", "2", "2", "3", "4"],
            "case_id": ["c9", "c5", "c5", "c7", "c8", "c8"],
            "cluster_id": ["1", "1", "2", "2", "3", "4"],
        }
    )
    groups = case_groups(clusters)
    assert groups.to_dict() == {"c5": "c5", "c7": "c5", "c8": "c8", "c9": "c5"}
    assert groups.index.name == "case_id"
    assert case_groups(clusters.iloc[::-1]).equals(groups)


def test_case_groups_from_the_hand_made_clusters():
    images, hashes = hand_made_example()
    clusters, _ = build_dedup_clusters(images, hashes, max_phash_distance=6, max_dhash_distance=6)
    groups = case_groups(clusters)
    assert groups["B"] == groups["A"] == groups["K"] == "A"
    assert groups["F"] == groups["G"] == groups["H"] == "F"
    assert groups["D"] == groups["E"] != groups["I"]
    assert groups["C"] == "C"


@pytest.fixture(scope="module")
def synthetic_hashed(tmp_path_factory):
    """A synthetic mirror with many planted near duplicates, hashed with imagehash directly."""
    imagehash = pytest.importorskip("imagehash")
    from PIL import Image

    from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror

    root = tmp_path_factory.mktemp("dedup_mirror")
    mirror = write_synthetic_mirror(root, n_cases=160, seed=3, image_size=(320, 240), defect_rate=0.5)
    plants = mirror.plants
    # The images a quality filter keeps: blown-out and black frames share hashes (see build_dedup_clusters).
    kept = plants[plants["planted"].isin(["clean", "near_duplicate", "dark_diagnostic", "wrong_format"])]

    def packed(image_hash) -> np.uint64:
        return np.uint64(int.from_bytes(np.packbits(image_hash.hash.ravel()).tobytes(), "big"))

    rows = []
    for image_id, path in kept[["image_id", "image_path"]].itertuples(index=False):
        with Image.open(root / path) as image:
            grey = image.convert("L")
        rows.append(
            (
                image_id,
                packed(imagehash.phash(grey)),
                packed(imagehash.dhash(grey)),
                str(imagehash.dhash(grey, hash_size=16)),
                near_duplicates.image_descriptor(grey),  # as the quality stage stores it (no resize below 512 px)
            )
        )
    hashes = pd.DataFrame(rows, columns=["image_id", "phash", "dhash", "dhash256", dedup.DESCRIPTOR_COLUMN])
    images = kept[["image_id", "case_id"]]
    return images, hashes, plants


def test_fine_hash_verification_drops_candidates_whose_detail_differs(synthetic_hashed):
    images, hashes, plants = synthetic_hashed
    hashes = hashes.drop(columns=[dedup.DESCRIPTOR_COLUMN])  # the hashes method, as before descriptors
    _c, coarse = build_dedup_clusters(
        images, hashes.drop(columns=["dhash256"]), max_phash_distance=22, max_dhash_distance=22
    )
    _c, verified = build_dedup_clusters(images, hashes, max_phash_distance=22, max_dhash_distance=22)
    assert len(verified) < len(coarse)
    assert (verified["dhash256_distance"] <= dedup.DEFAULT_MAX_DHASH256_DISTANCE).all()
    loose = planted_near_duplicate_scores(coarse, plants)
    tight = planted_near_duplicate_scores(verified, plants)
    assert tight["precision"] > loose["precision"] and tight["recall"] >= 0.9, (loose, tight)
    with pytest.raises(ValueError, match="fine hashes"):
        build_dedup_clusters(images, hashes.assign(dhash256=None))


@pytest.mark.parametrize("method", ["auto", "hashes"])
def test_planted_near_duplicates_found_with_high_precision_and_recall(synthetic_hashed, method):
    images, hashes, plants = synthetic_hashed
    assert (plants["planted"] == "near_duplicate").sum() >= 10
    clusters, pairs = build_dedup_clusters(images, hashes, method=method)
    if method == "auto":  # descriptors present: the keypoints method, its scores in the pairs table
        assert {"crop_phash_distance", "keypoint_inliers"} <= set(pairs.columns)
        assert (pairs["keypoint_inliers"] >= dedup.DEFAULT_MIN_KEYPOINT_INLIERS).all()
        assert (pairs["crop_phash_distance"] <= dedup.DEFAULT_MAX_CROP_PHASH_DISTANCE).all()
    assert list(pairs.columns[: len(dedup.PAIR_TABLE_COLUMNS)]) == list(dedup.PAIR_TABLE_COLUMNS)
    by_pairs = planted_near_duplicate_scores(pairs, plants)
    assert by_pairs["n_planted"] >= 10
    assert by_pairs["recall"] >= 0.9, by_pairs
    assert by_pairs["precision"] >= 0.9, by_pairs
    by_clusters = planted_near_duplicate_scores(clusters, plants)
    assert by_clusters["recall"] >= 0.9 and by_clusters["precision"] >= 0.9, by_clusters


def test_keypoints_method_needs_descriptors_and_names_a_bad_method(synthetic_hashed):
    images, hashes, _ = synthetic_hashed
    with pytest.raises(ValueError, match="near_duplicate_descriptor"):
        build_dedup_clusters(images, hashes.drop(columns=[dedup.DESCRIPTOR_COLUMN]), method="keypoints")
    with pytest.raises(ValueError, match="method must be"):
        build_dedup_clusters(images, hashes, method="cnn")
    with pytest.raises(ValueError, match="descriptor 0 is NoneType"):
        build_dedup_clusters(images, hashes.assign(**{dedup.DESCRIPTOR_COLUMN: None}))

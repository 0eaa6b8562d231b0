"""Tests for core.hamming: the exact Hamming search (every plan returns the brute-force pairs), its inputs,
the refined pigeonhole and the plan."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scin_pipeline.core import hamming
from scin_pipeline.core.hamming import find_near_duplicate_pairs
from scin_pipeline_tests.core.hashes import flip_bits, random_hashes

# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def reference_pairs(hashes: np.ndarray, max_distance: int, hashes2: np.ndarray | None = None) -> set:
    """The O(N^2) truth: the full distance matrix, written independently of the module."""
    other = hashes if hashes2 is None else hashes2
    distance = np.bitwise_count(hashes[:, None] ^ other[None, :])
    hit = distance <= max_distance
    if hashes2 is None:
        hit &= np.triu(np.ones_like(hit), k=1)
    i, j = np.nonzero(hit)
    return set(zip(i.tolist(), j.tolist(), distance[i, j].tolist()))


def as_set(pairs: pd.DataFrame) -> set:
    return set(zip(pairs["i"].tolist(), pairs["j"].tolist(), pairs["distance"].tolist()))


@pytest.fixture(scope="module")
def search_hashes() -> np.ndarray:
    """3,000 random hashes, planted near pairs at distances 0..12, exact copies, and a crowded family that
    shares its top 40 bits (so substring buckets hold many members)."""
    rng = np.random.default_rng(20240229)
    base = random_hashes(rng, 3000)
    planted = [flip_bits(rng, base[s], int(k)) for s, k in zip(rng.integers(0, 3000, 800), np.arange(800) % 13)]
    copies = base[rng.integers(0, 3000, 40)]
    family_top = int(rng.integers(0, 1 << 40)) << 24
    family = np.array([family_top | int(low) for low in rng.integers(0, 1 << 24, 150)], dtype=np.uint64)
    hashes = np.concatenate([base, np.array(planted, dtype=np.uint64), copies, family])
    return hashes[rng.permutation(hashes.size)]


# --------------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_distance", [0, 2, 5, 8])
@pytest.mark.parametrize("n_substrings", [None, 0, 3, 4, 5, 7, 11])
def test_search_returns_exactly_the_brute_force_pairs(search_hashes, max_distance, n_substrings):
    found = find_near_duplicate_pairs(search_hashes, max_distance, n_substrings=n_substrings)
    i, j = found["i"].to_numpy(), found["j"].to_numpy()
    assert (i < j).all()
    assert not found.duplicated(["i", "j"]).any()
    assert found.equals(found.sort_values(["i", "j"]).reset_index(drop=True))
    assert (found["distance"].to_numpy() == np.bitwise_count(search_hashes[i] ^ search_hashes[j])).all()
    assert as_set(found) == reference_pairs(search_hashes, max_distance)


def test_search_finds_the_planted_distances_around_the_threshold(search_hashes):
    # The fixture plants pairs at every distance 0..12: d = 6 must keep 0..6 and drop 7 and 8.
    found = find_near_duplicate_pairs(search_hashes, 6)
    assert set(found["distance"].unique()) == set(range(0, 7))


@pytest.mark.parametrize("n_substrings", [None, 0, 3, 6])
@pytest.mark.parametrize("max_distance", [1, 6])
def test_two_set_search_matches_brute_force(search_hashes, n_substrings, max_distance):
    rng = np.random.default_rng(7)
    queries = np.array(
        [flip_bits(rng, h, int(k)) for h, k in zip(search_hashes[:700], np.arange(700) % 9)], dtype=np.uint64
    )
    found = find_near_duplicate_pairs(search_hashes, max_distance, hashes2=queries, n_substrings=n_substrings)
    assert not found.duplicated(["i", "j"]).any()
    assert as_set(found) == reference_pairs(search_hashes, max_distance, queries)


@pytest.mark.parametrize("block_size", [1, 7, 1000])
def test_block_size_bounds_memory_not_the_result(search_hashes, block_size):
    expected = find_near_duplicate_pairs(search_hashes, 5, n_substrings=4)
    assert find_near_duplicate_pairs(search_hashes, 5, n_substrings=4, block_size=block_size).equals(expected)


def test_identical_hashes_pair_with_each_other_once():
    hashes = np.full(60, 0x0123456789ABCDEF, dtype=np.uint64)
    found = find_near_duplicate_pairs(hashes, 3, n_substrings=4)
    assert len(found) == 60 * 59 // 2
    assert (found["distance"] == 0).all()


def test_tiny_and_empty_inputs():
    assert find_near_duplicate_pairs(np.zeros(0, np.uint64), 4).empty
    assert find_near_duplicate_pairs(np.array([5], np.uint64), 4).empty
    pair = find_near_duplicate_pairs(np.array([0b1011, 0b0011], np.uint64), 1)
    assert pair[["i", "j", "distance"]].values.tolist() == [[0, 1, 1]]
    with pytest.raises(ValueError):
        find_near_duplicate_pairs(np.array([1, 2], np.uint64), -1)


def test_int64_bit_patterns_are_reinterpreted_and_missing_hashes_refused():
    values = np.array([np.uint64(2**63 + 5), np.uint64(2**63 + 4)], dtype=np.uint64)
    as_int64 = values.view(np.int64)  # what a store without uint64 support keeps
    assert (hamming.as_uint64_hashes(as_int64) == values).all()
    nullable = pd.Series(pd.array([2**63 + 5, 2**63 + 4], dtype="UInt64"))
    assert (hamming.as_uint64_hashes(nullable) == values).all()  # no float round trip: the low bit survives
    with pytest.raises(ValueError, match="missing"):
        hamming.as_uint64_hashes(pd.Series(pd.array([1, None], dtype="UInt64")))
    with pytest.raises(TypeError):
        hamming.as_uint64_hashes(np.array([1.0, 2.0]))


def test_refined_pigeonhole_radii():
    assert [t.radius for t in hamming.substring_tables(3, 8)] == [2, 2, 2]  # 8 = 2*3 + 2
    assert [t.radius for t in hamming.substring_tables(4, 6)] == [1, 1, 1, 0]  # 6 = 1*4 + 2
    assert [t.radius for t in hamming.substring_tables(5, 3)] == [0, 0, 0, 0, -1]  # 3 = 0*5 + 3
    tables = hamming.substring_tables(3, 0)
    assert [t.width for t in tables] == [22, 21, 21] and sum(t.width for t in tables) == 64
    assert int(np.bitwise_or.reduce([t.bit_mask for t in tables])) == 2**64 - 1


def test_plan_uses_multi_index_at_scale_and_brute_force_when_tiny():
    big = hamming.plan_search(1_000_000, 8)
    assert big.method == "multi_index"
    assert max(t.width for t in big.tables if t.radius >= 0) <= hamming.MAX_DENSE_SUBSTRING_BITS
    assert hamming.plan_search(10_000, 8).method == "multi_index"
    assert hamming.plan_search(50, 8).method == "brute_force"
    with pytest.raises(ValueError):
        hamming.plan_search(1000, 8, n_substrings=2)  # 32-bit substrings: no dense key space

"""--select as users write it (scin_pipeline.selection), on the real asset graph, without running it."""

from __future__ import annotations

import pytest
from dagster import AssetKey

from scin_pipeline.definitions import defs
from scin_pipeline.selection import SelectionError, key_list_to_selection_string, resolve_selection


@pytest.fixture(scope="module")
def graph():
    return defs.resolve_asset_graph()


def names(resolved) -> set[str]:
    return {key.to_user_string() for key in resolved.keys}


def test_a_comma_separated_key_list_selects_those_keys_and_the_multi_asset_siblings(graph):
    resolved = resolve_selection("raw_metadata,cases,images", graph)
    assert names(resolved) == {"raw_metadata", "cases", "images", "metadata_quarantine"}
    assert resolved.added_siblings == ("metadata_quarantine",)
    assert "metadata_quarantine" in resolved.note and "multi-asset" in resolved.note


def test_dagster_syntax_gives_the_same_keys_as_the_list(graph):
    by_syntax = resolve_selection("key:raw_metadata or key:cases or key:images", graph)
    assert by_syntax.keys == resolve_selection("raw_metadata, cases ,images,", graph).keys


def test_nothing_is_added_when_no_multi_asset_is_split(graph):
    resolved = resolve_selection("group:ingest", graph)
    assert resolved.added_siblings == () and resolved.note is None
    assert AssetKey("image_files") in resolved.keys and AssetKey("image_quality") not in resolved.keys


def test_list_marks_become_layers(graph):
    assert key_list_to_selection_string("*image_files,cases++") == '+key:"image_files" or key:"cases"+2'
    upstream = names(resolve_selection("*image_files", graph))
    assert {"raw_metadata", "images", "image_files"} <= upstream and "image_quality" not in upstream
    one_up = names(resolve_selection("+image_files,", graph))
    assert "raw_metadata" not in one_up and {"images", "image_files"} <= one_up


@pytest.mark.parametrize("text", ["bogus_asset", "raw_metadata,bogus_asset", "key:(", "  ", "raw metadata,cases"])
def test_a_bad_selection_is_one_line_with_an_example_and_the_asset_keys(graph, text):
    with pytest.raises(SelectionError) as caught:
        resolve_selection(text, graph)
    message = str(caught.value)
    assert "\n" not in message
    assert "e.g. 'raw_metadata,cases'" in message
    assert "asset keys: " in message and "labeled_splits" in message and "model_card" in message


def test_no_selection_means_everything(graph):
    assert resolve_selection(None, graph) is None

"""``--select`` as users write it: Dagster's selection syntax, or the comma-separated key list that
``dagster asset materialize --select`` takes.

- ``key:cases+``, ``group:ingest``, ``+key:image_files``: Dagster's selection syntax, as it is.
- ``raw_metadata,cases,images``: a key list. Each item may carry the list syntax's layer marks: ``*key``
  (all upstream), ``+key`` (one layer up, ``++key`` two), and the same after the key for downstream.
- Selecting part of a multi-asset (``cases`` of ``parsed_metadata``) adds its siblings, which Dagster
  must materialise together (``required_multi_asset_neighbors``); the result says which were added.
- A selection that cannot be parsed or names no asset raises :class:`SelectionError` with one line that
  shows an example and lists the asset keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dagster import AssetKey, AssetSelection

EXAMPLES = "e.g. 'raw_metadata,cases' or 'key:image_files+' or 'group:ingest'"
_LIST_ITEM = re.compile(r"^(?P<up>\*|\+*)(?P<key>[A-Za-z0-9_][A-Za-z0-9_/\-]*)(?P<down>\*|\+*)$")


class SelectionError(ValueError):
    """A ``--select`` value that is not a selection of this graph's assets."""


@dataclass(frozen=True)
class ResolvedSelection:
    keys: frozenset[AssetKey]  # what will be materialised, siblings included
    added_siblings: tuple[str, ...]  # keys added because a multi-asset must run whole

    @property
    def note(self) -> str | None:
        """One line for the user when siblings were added, else None."""
        if not self.added_siblings:
            return None
        return (
            f"also selected {', '.join(self.added_siblings)}: a multi-asset is materialised whole "
            f"with the part you selected"
        )


def _upstream(marks: str) -> str:
    """List-syntax marks before a key (``*`` all layers, each ``+`` one) in the selection syntax."""
    return "+" if marks == "*" else (f"{len(marks)}+" if marks else "")


def _downstream(marks: str) -> str:
    return "+" if marks == "*" else (f"+{len(marks)}" if marks else "")


def key_list_to_selection_string(text: str, known: list[str] | None = None) -> str:
    """``'*raw_metadata,cases+'`` -> ``'+key:"raw_metadata" or key:"cases"+1'`` (Dagster's syntax).
    With ``known``, every listed key must be one of them (Dagster's ``or`` would drop an unknown one)."""
    parts = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        match = _LIST_ITEM.match(item)
        if match is None:
            raise SelectionError(f"{item!r} is not an asset key")
        if known is not None and match["key"] not in known:
            raise SelectionError(f"no asset {match['key']!r}")
        parts.append(f'{_upstream(match["up"])}key:"{match["key"]}"{_downstream(match["down"])}')
    return " or ".join(parts)


def _known_keys(asset_graph) -> list[str]:
    return sorted(key.to_user_string() for key in asset_graph.get_all_asset_keys())


def resolve_selection(text: str | None, asset_graph) -> ResolvedSelection | None:
    """The asset keys ``text`` selects in ``asset_graph`` (None: no selection, i.e. everything)."""
    if text is None:
        return None
    known = _known_keys(asset_graph)
    hint = f"{EXAMPLES}; asset keys: {', '.join(known)}"
    stripped = text.strip()
    try:
        string = key_list_to_selection_string(stripped, known) if "," in stripped else stripped
        if not string:
            raise SelectionError("the selection is empty")
        selection = AssetSelection.from_coercible(string)
        keys = frozenset(selection.resolve(asset_graph))
        with_siblings = frozenset(AssetSelection.assets(*keys).required_multi_asset_neighbors().resolve(asset_graph))
    except SelectionError as exc:
        raise SelectionError(f"bad --select {text!r}: {exc} ({hint})") from None
    except Exception as exc:  # Dagster's parse and unknown-key errors: one line, not a traceback
        # Dagster's messages run on; their first sentence names the problem.
        first_line = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise SelectionError(f"bad --select {text!r}: {first_line} ({hint})") from None
    if not keys:
        raise SelectionError(f"--select {text!r} selects no asset ({hint})")
    added = tuple(sorted(k.to_user_string() for k in with_siblings - keys))
    return ResolvedSelection(keys=keys | with_siblings, added_siblings=added)

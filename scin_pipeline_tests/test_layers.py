"""The layers of the package, read from its source (every import, module level or inside a function):

- core/ (subpackages such as core/synthetic/ included) is the pure core: no Dagster, nothing from the
  layers above it (assets, resources, serve, ...);
- serve/ runs without the orchestrator: nothing from Dagster, the assets or the resources;
- an asset module takes from another asset module only public names (shared helpers live in
  assets/_metadata.py or in core/).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import scin_pipeline

PACKAGE = Path(scin_pipeline.__file__).parent
ABOVE_CORE = (
    "scin_pipeline.assets",
    "scin_pipeline.resources",
    "scin_pipeline.serve",
    "scin_pipeline.runner",
    "scin_pipeline.cli",
    "scin_pipeline.orchestration",
    "scin_pipeline.definitions",
    "scin_pipeline.selection",
    "scin_pipeline.run_console",
)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in the file; names is empty for ``import x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}:{node.lineno}: relative import; the package uses absolute imports")
    return found


def modules(folder: str) -> list[Path]:
    """Every module under the folder, its subpackages included."""
    return sorted((PACKAGE / folder).rglob("*.py"))


def module_id(path: Path) -> str:
    return str(path.relative_to(PACKAGE))  # unique where names are not (two __init__.py)


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", modules("core"), ids=module_id)
def test_core_imports_neither_dagster_nor_the_layers_above(path):
    bad = [
        f"{path.name}:{line}: {module}"
        for line, module, _ in imports(path)
        if within(module, ("dagster", "dagster_webserver", *ABOVE_CORE))
    ]
    assert not bad, bad


@pytest.mark.parametrize("path", modules("serve"), ids=module_id)
def test_serve_imports_neither_dagster_nor_assets_nor_resources(path):
    bad = [
        f"{path.name}:{line}: {module}"
        for line, module, _ in imports(path)
        if within(
            module,
            (
                "dagster",
                "scin_pipeline.assets",
                "scin_pipeline.resources",
                "scin_pipeline.runner",
                "scin_pipeline.orchestration",
                "scin_pipeline.definitions",
            ),
        )
    ]
    assert not bad, bad


@pytest.mark.parametrize("path", modules("assets"), ids=module_id)
def test_asset_modules_share_no_private_names(path):
    own = f"scin_pipeline.assets.{path.stem}"
    bad = [
        f"{path.name}:{line}: {module}.{name}"
        for line, module, names in imports(path)
        if within(module, ("scin_pipeline.assets",)) and module != own
        for name in names
        if name.startswith("_")
    ]
    assert not bad, bad


def test_core_subpackages_are_checked_too():
    checked = {module_id(p) for p in modules("core")}
    assert "core/synthetic/mirror.py" in checked and "core/synthetic/__init__.py" in checked

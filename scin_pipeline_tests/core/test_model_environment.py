"""core.model_environment: which scin_pipeline modules a logged model ships, and its pinned requirements.
The end-to-end proof (a model loading with the installed package hidden) is in
resources/test_mlflow_tracking.py; these pin the rules on a small synthetic package."""

from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest

from scin_pipeline.core import model_environment


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def package(tmp_path) -> Path:
    """A synthetic scin_pipeline: entry imports a sibling lazily and relatively; unused is never imported."""
    root = tmp_path / "src" / "scin_pipeline"
    write(root, "__init__.py", "")
    write(root, "core/__init__.py", "")
    write(
        root,
        "core/entry.py",
        "import numpy\nfrom scin_pipeline.core.helper import value\n"
        "def later():\n    from . import lazy\n    import json\n    return lazy\n",
    )
    write(root, "core/helper.py", "from scin_pipeline.core import shared\nvalue = 1\n")
    write(root, "core/lazy.py", "import pandas as pd\nfrom ..core.shared import x\n")
    write(root, "core/shared.py", "x = 2\n")
    write(root, "core/unused.py", "import dagster\n")
    write(root, "data/big.csv", "a,b\n")
    return root


def test_the_closure_follows_function_level_and_relative_imports_and_nothing_else(package):
    modules, third_party = model_environment.module_closure(["scin_pipeline.core.entry"], package)
    assert modules == [
        "scin_pipeline",
        "scin_pipeline.core",
        "scin_pipeline.core.entry",
        "scin_pipeline.core.helper",
        "scin_pipeline.core.lazy",
        "scin_pipeline.core.shared",
    ]
    assert third_party == {"numpy", "pandas"}  # json is standard library; dagster only in the unused module


def test_staged_code_keeps_the_package_layout_and_only_the_closure(package, tmp_path):
    modules, _ = model_environment.module_closure(["scin_pipeline.core.entry"], package)
    staged = model_environment.stage_code(modules, tmp_path / "staging", package)
    assert staged.name == "scin_pipeline"
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert files == [
        "__init__.py",
        "core/__init__.py",
        "core/entry.py",
        "core/helper.py",
        "core/lazy.py",
        "core/shared.py",
    ]


def test_requirements_are_pinned_installed_distributions_with_the_keras_backend():
    requirements = model_environment.pinned_requirements({"sklearn", "PIL", "mlflow"}, keras_backend="tensorflow")
    pinned = dict(line.split("==") for line in requirements)
    # Import names map to distribution names (PEP 503 spelling); mlflow's module is the `mlflow` distribution.
    assert {"scikit-learn", "pillow", "mlflow", "tensorflow-cpu", "cloudpickle"} <= set(pinned)
    assert "mlflow-skinny" not in pinned
    assert pinned["scikit-learn"] == importlib_metadata.version("scikit-learn")
    assert requirements == sorted(requirements, key=str.lower)


def test_a_module_no_distribution_provides_is_named():
    with pytest.raises(ValueError, match="no_such_library_here"):
        model_environment.pinned_requirements({"numpy", "no_such_library_here"})
    with pytest.raises(ValueError, match="unknown Keras backend 'mxnet'"):
        model_environment.pinned_requirements({"numpy"}, keras_backend="mxnet")


def test_the_shipped_closure_of_the_pyfunc_is_the_prediction_path_only():
    modules, third_party = model_environment.module_closure([model_environment.PYFUNC_MODULE])
    assert "scin_pipeline.core.image_cache" in modules and "scin_pipeline.core.metadata_model" in modules
    assert not any(m.startswith(("scin_pipeline.assets", "scin_pipeline.serve", "scin_pipeline.data")) for m in modules)
    assert "dagster" not in third_party

"""What a logged model carries so that it loads outside this repository: the ``scin_pipeline`` modules its
pyfunc runs (MLflow ``code_paths``) and the pinned pip requirements of the libraries those modules import.

Which modules. The pyfunc (``core.packaged_model``) and every ``scin_pipeline`` module it imports,
transitively, read from the source with ``ast`` (imports inside functions included: a lazy import still
runs when its branch does), plus the package's ``__init__`` files. Today that is ``core.packaged_model``,
``core.image_cache``, ``core.imageio``, ``core.atomic``, ``core.calibration``, ``core.metadata_model``,
``core.questionnaire``, ``core.schema``, ``core.splits`` and this module (each logged model lists its own in
its metadata, ``scin_code_modules``): about 155 kB of source, where the whole package is 3.3 MB (2.2 MB of the
bundled SCIN metadata, which no prediction reads). Reading the closure from the code, rather than listing it,
means a new import in the prediction path ships itself; the fresh-process test in
``scin_pipeline_tests/resources/test_mlflow_tracking.py`` loads a model with the installed package hidden,
so a module the closure missed fails there.

A shipped copy shadows nothing in a process that has already imported ``scin_pipeline`` (the pipeline, the
web service): Python keeps the imported package, so those run the installed code. Elsewhere (``mlflow models
serve``, a user's script, a fresh environment) MLflow puts the model's ``code/`` folder first on
``sys.path`` and the copy is what runs: the code the model was trained and logged with.

Which requirements. The distributions that provide the third-party top-level modules those modules import
(``importlib.metadata.packages_distributions``), each pinned to the version installed here, plus MLflow's own
pyfunc defaults (cloudpickle, which pickled the wrapper) and, for a Keras model, the installed distribution
of the Keras backend it was trained under (Keras imports its backend by name, which ``ast`` cannot see). A
scikit-learn (metadata-only) model leaves Keras and every backend out: its prediction never imports them.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path

PACKAGE = "scin_pipeline"
PYFUNC_MODULE = "scin_pipeline.core.packaged_model"
# Keras backends by their import name; jax needs its compiled half too.
_BACKEND_MODULES = {"tensorflow": ("tensorflow",), "jax": ("jax", "jaxlib"), "torch": ("torch",)}
# Third-party modules only a Keras model's prediction imports: left out of a scikit-learn model's requirements.
KERAS_ONLY_MODULES = ("keras", *sorted({m for modules in _BACKEND_MODULES.values() for m in modules}))


def package_root() -> Path:
    """The folder that holds the ``scin_pipeline`` package (its parent is what goes on ``sys.path``)."""
    import scin_pipeline

    return Path(scin_pipeline.__file__).resolve().parent


def module_file(module: str, root: Path | None = None) -> Path:
    """The source file of ``scin_pipeline.<...>`` module ``module`` (a package's ``__init__.py``)."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        raise ValueError(f"{module!r} is not a {PACKAGE} module")
    base = (root or package_root()).joinpath(*module.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no source for {module} under {root or package_root()}")


def _imports(path: Path, module: str) -> set[str]:
    """Every module name ``path`` imports (absolute, relative ones resolved), at any depth of the file."""
    names: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            # `from package import name` may import a submodule: kept when it resolves to one.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def module_closure(roots: Iterable[str], root: Path | None = None) -> tuple[list[str], set[str]]:
    """(the ``scin_pipeline`` modules ``roots`` need, sorted; the top-level third-party modules they import).

    Parent packages are included (their ``__init__`` runs on import). Standard-library modules are left out
    of the third-party set."""
    package_dir = root or package_root()
    needed: set[str] = set()
    third_party: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in needed:
            continue
        try:
            path = module_file(module, package_dir)
        except FileNotFoundError:
            continue  # `from scin_pipeline.core.x import name`: name is not a module
        needed.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        for name in _imports(path, module):
            top = name.split(".")[0]
            if top == PACKAGE:
                todo.append(name)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return sorted(needed), third_party


def stage_code(modules: Iterable[str], destination: Path, root: Path | None = None) -> Path:
    """Copy the source files of ``modules`` into ``destination/scin_pipeline/...`` (the package layout) and
    return that package folder: the one entry of MLflow's ``code_paths``."""
    package_dir = root or package_root()
    target = Path(destination) / PACKAGE
    for module in modules:
        source = module_file(module, package_dir)
        copy = target / source.relative_to(package_dir)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
    return target


def canonical_name(distribution: str) -> str:
    """A distribution's name as pip compares them (PEP 503): ``tensorflow_cpu`` -> ``tensorflow-cpu``."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _distribution_for(module: str, provided_by: Mapping[str, list[str]]) -> str | None:
    candidates = sorted({canonical_name(d) for d in provided_by.get(module) or []})
    if not candidates:
        return None
    # mlflow is provided by mlflow, mlflow-skinny and mlflow-tracing: the one named like the module wins.
    return canonical_name(module) if canonical_name(module) in candidates else candidates[0]


def pinned_requirements(third_party_modules: Iterable[str], *, keras_backend: str | None = None) -> list[str]:
    """``name==version`` for the installed distributions of ``third_party_modules`` (and of the Keras
    backend's modules), MLflow's pyfunc defaults added. A module no installed distribution provides is an
    error naming it: a model that imports it could not be installed anywhere from these requirements."""
    from mlflow.pyfunc.model import get_default_pip_requirements

    provided_by = importlib_metadata.packages_distributions()
    modules = set(third_party_modules)
    if keras_backend is not None:
        if keras_backend not in _BACKEND_MODULES:
            raise ValueError(f"unknown Keras backend {keras_backend!r} (one of {sorted(_BACKEND_MODULES)})")
        modules.update(_BACKEND_MODULES[keras_backend])
    requirements: dict[str, str] = {}
    unprovided = []
    for module in sorted(modules):
        distribution = _distribution_for(module, provided_by)
        if distribution is None:
            unprovided.append(module)
            continue
        requirements[distribution] = f"{distribution}=={importlib_metadata.version(distribution)}"
    if unprovided:
        raise ValueError(f"no installed distribution provides the modules {unprovided}: cannot pin them")
    for default in get_default_pip_requirements():
        requirements.setdefault(canonical_name(re.split(r"[=<>!~ ;\[]", default, maxsplit=1)[0]), default)
    return [requirements[name] for name in sorted(requirements)]

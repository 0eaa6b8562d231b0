"""The ``scin-pipeline`` console script: run, demo, ui, serve, predict.

Errors a user can fix (unreachable bucket, unwritable data root, bad arguments) are printed as one clear
message with a non-zero exit; set SCIN_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from scin_pipeline.core.data_root import (
    DATA_ROOT_ENV,
    DEFAULT_SOURCE,
    GCS_ACCESS_ENV,
    METADATA_DIR_ENV,
    SOURCE_ENV,
    DataRootLayout,
    default_data_root,
)
from scin_pipeline.core.mlflow_registry import MLFLOW_UI_URL_ENV

DEMO_DEFAULT_OUT = "scin-demo"

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_SKIPPED_FILES = 4  # predict: every readable image classified, some files skipped (rows with their error)


def _fail(message: str, code: int) -> int:
    print(f"scin-pipeline: {message}", file=sys.stderr)
    return code


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--select",
        default=None,
        help="Dagster asset selection ('key:image_files+', 'group:ingest') or a comma-separated "
        "key list as `dagster asset materialize` takes ('raw_metadata,cases'); default: all",
    )
    parser.add_argument(
        "--strict", action="store_true", help="also exit non-zero when a non-blocking ERROR check fails"
    )
    parser.add_argument(
        "--only-stale",
        action="store_true",
        help="materialise only missing or stale assets (code and data versions); "
        "nothing at all when everything is up to date",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="Dagster run config (YAML: ops, resources), as `dagster asset materialize -c` takes; merged "
        "over what the command builds, the file winning key by key (repeatable: later files win)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="set_values",
        metavar="KEY=VALUE",
        help="one config value: OP.FIELD=VALUE sets ops.OP.config.FIELD "
        "(--set quality_filtered_index.max_quarantined_fraction=0.2); a key starting with ops., "
        "resources., execution. or loggers. is the full path; VALUE is read as YAML (repeatable)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: Dagster's run log and the libraries' own logs (TensorFlow, MLflow progress "
        "bars); -vv: Dagster's debug events too",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scin-pipeline", description="Orchestrated SCIN pipeline: curated data, classifiers and fairness reports."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialise the asset graph on embedded defaults")
    run.add_argument(
        "--source",
        default=os.environ.get(SOURCE_ENV, DEFAULT_SOURCE),
        help="'gcs' (the public bucket gs://dx-scin-public-data) or a local mirror folder",
    )
    run.add_argument("--data-root", default=default_data_root())
    run.add_argument(
        "--limit-cases", type=int, default=None, help="a deterministic sample of N cases (default: all 5,033)"
    )
    _add_run_arguments(run)

    demo = sub.add_parser("demo", help="write a SYNTHETIC mirror in the bucket's layout and run on it")
    demo_metadata = demo.add_mutually_exclusive_group()
    demo_metadata.add_argument(
        "--metadata",
        default=None,
        metavar="DIR",
        help="folder with the real scin_cases.csv and scin_labels.csv (default: "
        f"${METADATA_DIR_ENV} if set, else the real SCIN 1.0.0 metadata bundled in "
        "the package)",
    )
    demo_metadata.add_argument(
        "--synthetic-metadata",
        action="store_true",
        help=f"generate the metadata too (fully synthetic; ignores ${METADATA_DIR_ENV})",
    )
    demo.add_argument("--cases", type=int, default=300, help="number of cases (default 300)")
    demo.add_argument("--out", default=DEMO_DEFAULT_OUT, help="output folder (the data root)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="side of the cached training images in px (default 64: CPU-sized; the pipeline's own default is 224)",
    )
    demo.add_argument("--epochs", type=int, default=12, help="maximum training epochs per model (default 12)")
    _add_run_arguments(demo)

    ui = sub.add_parser("ui", help="dagster dev on 127.0.0.1 plus the MLflow UI")
    ui.add_argument("--data-root", default=default_data_root())
    ui.add_argument("--source", default=os.environ.get(SOURCE_ENV, DEFAULT_SOURCE))
    ui.add_argument("--port", type=int, default=3000)
    ui.add_argument("--mlflow-port", type=int, default=5000)

    serve = sub.add_parser(
        "serve", help="a web page and JSON API that classify one photo with the champion (NOT A DIAGNOSIS)"
    )
    serve.add_argument(
        "--data-root",
        default=default_data_root(),
        help="where the embedded MLflow store is (ignored when MLFLOW_TRACKING_URI is set)",
    )
    serve.add_argument(
        "--model",
        default="models:/scin-condition-classifier@champion",
        help="models:/NAME@ALIAS or models:/NAME/VERSION (default: the champion)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--store-uploads",
        default=None,
        metavar="DIR",
        help="keep accepted uploads in DIR under random names (default: kept in memory only)",
    )
    serve.add_argument(
        "--alias-poll-s",
        type=float,
        default=5.0,
        metavar="S",
        help="re-resolve the alias every S seconds: a new version is swapped in without a restart, "
        "a removed alias makes /predict answer 503 (default 5; 0: never; a models:/NAME/VERSION "
        "is never re-resolved)",
    )
    from scin_pipeline.serve.limits import add_limit_arguments  # argparse only: no FastAPI import

    add_limit_arguments(serve)  # --max-upload-mb, --max-megapixels, timeouts, ... (docs/serving.md, Limits)

    predict = sub.add_parser(
        "predict",
        help="classify image files and folders with the champion into a CSV (NOT A DIAGNOSIS)",
        description="Classify PNG/JPEG files, and folders searched recursively for them, with a registered "
        "model (the serve command's model, preprocessing and quality verdict); one CSV row per image. "
        f"Exit status: 0 every image classified; {EXIT_SKIPPED_FILES} some files could not be read (each has "
        f"a row with its error); {EXIT_USAGE} bad arguments or no MLflow store; {EXIT_FAILED} the model "
        "cannot be loaded or used.",
    )
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    predict.add_argument(
        "--model",
        default="models:/scin-condition-classifier@champion",
        help="models:/NAME@ALIAS or models:/NAME/VERSION (default: the champion)",
    )
    predict.add_argument(
        "--data-root",
        default=default_data_root(),
        help="where the embedded MLflow store is (ignored when MLFLOW_TRACKING_URI is set)",
    )
    predict.add_argument("--out", default="predictions.csv", help="CSV to write (default predictions.csv)")
    predict.add_argument(
        "--answers",
        metavar="CSV",
        help="questionnaire answers per image: a `path` column (as the output CSV writes it) and any of the "
        "web form's fields (check-box groups comma-separated); images without a row are unanswered",
    )
    predict.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    predict.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding threads (default: up to 4)"
    )
    predict.add_argument(
        "--max-megapixels",
        type=float,
        default=25.0,
        help="refuse (as an error row) a picture whose header declares more pixels, before decoding (default 25)",
    )
    predict.add_argument(
        "--max-file-mb", type=float, default=64.0, help="refuse (as an error row) a larger file (default 64)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from scin_pipeline.run_console import quiet_console

    args = build_parser().parse_args(argv)
    try:
        with quiet_console(getattr(args, "verbose", 1)):
            commands = {"run": cmd_run, "demo": cmd_demo, "ui": cmd_ui, "serve": cmd_serve, "predict": cmd_predict}
            return commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear line for the user; the traceback only on request
        if os.environ.get("SCIN_DEBUG"):
            raise
        return _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)


def demo_run_config(image_size: int, epochs: int) -> dict:
    """Training settings that keep the demo CPU-sized: small cached images, few epochs, heads on frozen
    embeddings (the asset's CPU default)."""
    keras_training = {"epochs": epochs, "batch_size": 32, "early_stopping_patience": 4}
    return {
        "ops": {
            # A few hundred cases hold few cases per condition: a lower bar keeps several classes (the
            # pipeline's default, 20, suits the full release).
            "labeled_splits": {"config": {"min_cases_per_class": 8}},
            "image_quality": {"config": {"tensor_sizes": [image_size]}},
            "baseline_cnn": {"config": keras_training},
            "resnet50_transfer": {"config": {**keras_training, "mode": "head_on_embeddings"}},
            "resnet50_fixmatch": {"config": {**keras_training, "mode": "head_on_embeddings"}},
            "efficientnet_transfer": {"config": {**keras_training, "mode": "head_on_embeddings"}},
            "multimodal": {"config": {**keras_training, "mode": "head_on_embeddings"}},
            # Synthetic images and a few hundred cases: deep-tone groups are too small to judge, so the
            # demo names a champion anyway, flagged "fairness not judged" on its version, card and page
            # (`scin-pipeline run` keeps the default, block).
            "model_comparison": {"config": {"unjudged_policy": "allow_with_flag"}},
        }
    }


_RUN_CONFIG_SECTIONS = ("ops", "resources", "execution", "loggers")


class UserConfigError(ValueError):
    """A --config file or --set value that cannot be read; the message names the file or the key."""


def user_run_config(files: list[str], set_values: list[str]) -> dict:
    """The run config given on the command line: each --config file (YAML mapping) deep-merged in order,
    then each --set KEY=VALUE (OP.FIELD means ops.OP.config.FIELD)."""
    import yaml

    from scin_pipeline.runner import merge_run_config

    config: dict = {}
    for name in files:
        try:
            loaded = yaml.safe_load(Path(name).expanduser().read_text())
        except OSError as exc:
            raise UserConfigError(f"--config {name}: cannot read: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise UserConfigError(f"--config {name}: not YAML: {' '.join(str(exc).split())}") from None
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise UserConfigError(f"--config {name}: the top level must be a mapping (ops:, resources:, ...)")
        config = merge_run_config(config, loaded)
    for item in set_values:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts) or len(parts) < 2:
            raise UserConfigError(f"--set {item}: expected KEY=VALUE with KEY as OP.FIELD or a full dotted path")
        if parts[0] not in _RUN_CONFIG_SECTIONS:
            parts = ["ops", parts[0], "config", *parts[1:]]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        nested: dict = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            nested = {part: nested}
        config = merge_run_config(config, nested)
    return config


def _execute(
    data_root: str, source: str, limit_cases: int | None, args: argparse.Namespace, run_config: dict | None = None
) -> int:
    from scin_pipeline.core.sources import SourceAccessDenied, SourceUnreachable
    from scin_pipeline.resources import ScinSourceResource
    from scin_pipeline.runner import DataRootError, RunConfigError, merge_run_config, prepare_data_root, run_pipeline
    from scin_pipeline.selection import SelectionError

    try:
        given = user_run_config(getattr(args, "config", []), getattr(args, "set_values", []))
    except UserConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    run_config = merge_run_config(run_config or {}, given)
    try:
        prepare_data_root(data_root)
    except DataRootError as exc:
        return _fail(str(exc), EXIT_USAGE)
    # The source as the run will open it (definitions.build_resources): credentials from $SCIN_GCS_*, then
    # --set/--config (resources.scin_source.config) over them.
    source_config = {
        "location": source,
        **{field: os.environ[name] for field, name in GCS_ACCESS_ENV.items() if name in os.environ},
        **run_config.get("resources", {}).get("scin_source", {}).get("config", {}),
    }
    try:
        ScinSourceResource(**source_config).open(timeout_s=15).check_reachable(timeout_s=15)
    except ValueError as exc:  # pydantic's ValidationError and GcsAccess's rules alike
        return _fail(f"resources.scin_source.config: {exc}", EXIT_USAGE)
    except SourceUnreachable as exc:
        hint = (
            "\nNo network to the SCIN bucket? Run the offline demo (bundled real metadata, SYNTHETIC "
            "images) instead:\n  make demo   (or: scin-pipeline demo --cases 300)"
        )
        offline_hint = (source == "gcs" or source.startswith("gs://")) and not isinstance(exc, SourceAccessDenied)
        return _fail(f"{exc}{hint if offline_hint else ''}", EXIT_UNREACHABLE)
    log_level = {0: "CRITICAL", 1: "INFO"}.get(args.verbose, "DEBUG")
    try:
        summary = run_pipeline(
            data_root=data_root,
            source=source,
            limit_cases=limit_cases,
            select=args.select,
            run_config=run_config,
            only_stale=args.only_stale,
            log_level=log_level,
            echo=lambda line: print(line, flush=True),
        )
    except (SelectionError, RunConfigError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    print(summary.render())
    print(f"tables: {DataRootLayout.of(data_root).tables}")
    return summary.exit_code(strict=args.strict)


def cmd_run(args: argparse.Namespace) -> int:
    if args.limit_cases is not None and args.limit_cases < 1:
        return _fail("--limit-cases must be at least 1", EXIT_USAGE)
    return _execute(args.data_root, args.source, args.limit_cases, args)


def cmd_demo(args: argparse.Namespace) -> int:
    from scin_pipeline.core import bundled_metadata
    from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror

    if args.cases < 1:
        return _fail("--cases must be at least 1", EXIT_USAGE)
    if args.image_size < 32 or args.epochs < 1:
        return _fail("--image-size must be at least 32 and --epochs at least 1", EXIT_USAGE)
    out = Path(args.out).expanduser().resolve()
    # Metadata: --synthetic-metadata, else --metadata, else $SCIN_METADATA_DIR, else the bundled release.
    chosen = args.metadata or os.environ.get(METADATA_DIR_ENV)
    if args.synthetic_metadata:
        metadata, metadata_key, metadata_text = None, None, "SYNTHETIC metadata (--synthetic-metadata)"
    elif chosen:
        given_by = "--metadata" if args.metadata else METADATA_DIR_ENV
        metadata = Path(chosen).expanduser().resolve()
        if not metadata.is_dir():
            return _fail(f"{given_by} {chosen}: no such folder", EXIT_USAGE)
        metadata_key, metadata_text = str(metadata), f"real SCIN metadata from {metadata} ({given_by})"
    else:
        metadata = bundled_metadata.verify()
        # The key names the release, not the folder: an extracted copy's temporary path changes per run.
        metadata_key = f"bundled:scin-{bundled_metadata.RELEASE}"
        metadata_text = bundled_metadata.DESCRIPTION
    layout = DataRootLayout.of(out)
    mirror = layout.synthetic_mirror
    params = {"metadata": metadata_key, "cases": args.cases, "seed": args.seed}
    params_file = layout.synthetic_mirror_params
    print(f"metadata: {metadata_text}; images: SYNTHETIC")
    # Same parameters, same mirror: reuse it so a rerun does no work (the generator is deterministic).
    reuse = mirror.exists() and params_file.exists() and json.loads(params_file.read_text()) == params
    if not reuse:
        out.mkdir(parents=True, exist_ok=True)
        print(f"writing a mirror of {args.cases} cases with SYNTHETIC images to {mirror}")
        generated = write_synthetic_mirror(
            mirror, metadata_dir=metadata, n_cases=args.cases, seed=args.seed, overwrite=True
        )
        params_file.write_text(json.dumps(params))
        print(
            f"  {generated.n_cases} cases, {generated.n_image_refs} image references, "
            f"{generated.n_files_written} synthetic image files; planted defects listed in "
            f"{mirror / 'synthetic_plants.csv'}"
        )
    else:
        print(f"reusing the SYNTHETIC mirror at {mirror}")
    print("NOTE: images are synthetic; no figure from this run describes real skin conditions.")
    return _execute(str(out), str(mirror), None, args, run_config=demo_run_config(args.image_size, args.epochs))


def cmd_ui(args: argparse.Namespace) -> int:
    from scin_pipeline.core import mlflow_ui
    from scin_pipeline.resources import MlflowTracking, StoragePaths
    from scin_pipeline.runner import DEFINITIONS_MODULE, embedded_instance, prepare_data_root

    root = prepare_data_root(args.data_root)
    layout = DataRootLayout.of(root)
    embedded_instance(root)  # writes dagster_home/dagster.yaml
    layout.mlflow.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(layout.dagster_home),
        DATA_ROOT_ENV: str(root),
        SOURCE_ENV: args.source,
    }
    env = mlflow_ui.ui_environment(env, tracking_uri=layout.mlflow_uri)
    # The experiment exists (made now if no run made it yet) and carries the UI's tags: the link opens its
    # runs list in classic-ML mode with metric columns.
    tracking = MlflowTracking(tracking_uri=env["MLFLOW_TRACKING_URI"], storage=StoragePaths(data_root=str(root)))
    mlflow_url = f"http://127.0.0.1:{args.mlflow_port}"
    runs_link = mlflow_ui.runs_url(mlflow_url, tracking.prepare_ui())
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    bin_dir = Path(sys.executable).parent
    dagster_cmd = [str(bin_dir / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(args.port)]
    dagster_cmd += ["-w", str(workspace)] if workspace.exists() else ["-m", DEFINITIONS_MODULE]
    mlflow_exe = bin_dir / "mlflow"
    mlflow_found = mlflow_exe.exists() or shutil.which("mlflow")
    if mlflow_found:
        # The candidates' asset metadata links to their runs in the MLflow UI started here.
        env.setdefault(MLFLOW_UI_URL_ENV, mlflow_url)
    procs = [subprocess.Popen(dagster_cmd, env=env, start_new_session=True)]
    if mlflow_found:
        command = mlflow_ui.ui_command(
            str(mlflow_exe if mlflow_exe.exists() else shutil.which("mlflow")),
            backend_store_uri=env["MLFLOW_TRACKING_URI"],
            port=args.mlflow_port,
        )
        procs.append(subprocess.Popen(command, env=env, start_new_session=True))
    print(f"Dagster UI: http://127.0.0.1:{args.port}   MLflow UI: {mlflow_url}")
    print(f"The candidates' runs: {runs_link}")
    print("Ctrl-C stops both.")
    # A SIGTERM to us must stop the children too (they run in their own process groups).
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        # `dagster dev` ignores SIGTERM: stop each process group, escalating to SIGKILL.
        for proc in procs:
            for sig in (signal.SIGINT, signal.SIGKILL):
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=15)
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        continue
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


def registry_uri(data_root: str) -> str | None:
    """$MLFLOW_TRACKING_URI, else the data root's embedded store; None when that store does not exist."""
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        return tracking_uri
    layout = DataRootLayout.of(data_root)
    return layout.mlflow_uri if layout.mlflow_db.is_file() else None


def no_store_message(data_root: str) -> str:
    return (
        f"no MLflow store at {DataRootLayout.of(data_root).mlflow_db}: no model has been trained under "
        f"--data-root {data_root}; run `scin-pipeline demo --out {data_root}` first (or set MLFLOW_TRACKING_URI)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """uvicorn on the FastAPI app of scin_pipeline.serve; the model (if the alias has one) is loaded before the
    port opens, and the alias is followed while it runs."""
    from scin_pipeline.serve.limits import limits_from_args

    if not 0 < args.port <= 65535:
        return _fail("--port must be in [1, 65535]", EXIT_USAGE)
    try:
        limits = limits_from_args(args)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if not 0 <= args.alias_poll_s <= 86400:
        return _fail("--alias-poll-s must be in [0, 86400] seconds", EXIT_USAGE)
    tracking_uri = registry_uri(args.data_root)
    if tracking_uri is None:
        return _fail(no_store_message(args.data_root), EXIT_USAGE)
    from scin_pipeline.serve import ServeError, create_app
    from scin_pipeline.serve.server import configure_logging, run_server

    try:
        app = create_app(
            args.model,
            tracking_uri=tracking_uri,
            **limits.app_options(),
            store_uploads_dir=args.store_uploads,
            alias_poll_s=args.alias_poll_s,
        )
    except ServeError as exc:
        return _fail(str(exc), EXIT_FAILED)
    print(
        f"{app.state.model_source.describe()}; at http://{args.host}:{args.port}/  (NOT A DIAGNOSIS; Ctrl-C stops)",
        flush=True,
    )
    configure_logging()
    # No access log (it would record client addresses): the app logs method, path, status and time only.
    run_server(app, host=args.host, port=args.port, limits=limits)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify the images under ``args.paths`` into a CSV (scin_pipeline.serve.file_prediction)."""
    if args.batch_size < 1 or args.workers < 1:
        return _fail("--batch-size and --workers must be at least 1", EXIT_USAGE)
    if not (args.max_megapixels > 0 and args.max_file_mb > 0):
        return _fail("--max-megapixels and --max-file-mb must be positive", EXIT_USAGE)
    out = Path(args.out).expanduser()
    if out.is_dir():
        return _fail(f"--out {out} is a folder: name the CSV file to write", EXIT_USAGE)
    from scin_pipeline.serve.file_prediction import PathsError, find_images, read_answers

    try:
        files = find_images(args.paths)
        answers = read_answers(args.answers, files) if args.answers else {}
    except PathsError as exc:
        return _fail(str(exc), EXIT_USAGE)
    tracking_uri = registry_uri(args.data_root)
    if tracking_uri is None:
        return _fail(no_store_message(args.data_root), EXIT_USAGE)
    import csv

    from tqdm import tqdm

    from scin_pipeline.core.atomic import atomic_target
    from scin_pipeline.serve.file_prediction import check_image_model, classify_files, output_columns
    from scin_pipeline.serve.model import ServeError, load_served_model
    from scin_pipeline.serve.prediction import notice_for

    try:
        served = load_served_model(args.model, tracking_uri=tracking_uri)
    except ServeError as exc:
        return _fail(str(exc), EXIT_FAILED)
    try:
        check_image_model(served)
    except ValueError as exc:
        return _fail(str(exc), EXIT_FAILED)
    print(f"{len(files)} image file(s); model {served.loaded_uri} ({served.kind})", file=sys.stderr, flush=True)
    if answers and not served.uses_metadata:
        print(
            f"{served.kind} model: the questionnaire answers of {len(answers)} image(s) are not used (it reads "
            "images only; column questionnaire = not used)",
            file=sys.stderr,
        )
    started, skipped = time.perf_counter(), 0
    # The progress bar shows on a terminal only (tqdm's disable=None); the CSV appears whole or not at all.
    with (
        tqdm(total=len(files), unit="img", file=sys.stderr, disable=None, desc="predict") as progress,
        atomic_target(out) as tmp,
        open(tmp, "w", newline="", encoding="utf-8") as stream,
    ):
        writer = csv.DictWriter(stream, fieldnames=output_columns(served.classes), restval="")
        writer.writeheader()
        rows = classify_files(
            served,
            files,
            batch_size=args.batch_size,
            workers=args.workers,
            max_pixels=int(args.max_megapixels * 1e6),
            max_file_bytes=int(args.max_file_mb * 2**20),
            on_batch=progress.update,
            answers=answers,
        )
        for row in rows:
            skipped += row["status"] != "ok"
            writer.writerow(row)
    seconds = time.perf_counter() - started
    classified = len(files) - skipped
    print(
        f"classified {classified} of {len(files)} image(s) in {seconds:.1f} s ({len(files) / max(seconds, 1e-9):.1f}"
        f" img/s) -> {out}",
        file=sys.stderr,
    )
    if skipped:
        print(
            f"skipped {skipped} file(s) that could not be read: their rows in {out} have status=error and the reason",
            file=sys.stderr,
        )
    print(notice_for(served), file=sys.stderr)
    return EXIT_SKIPPED_FILES if skipped else 0


if __name__ == "__main__":
    sys.exit(main())

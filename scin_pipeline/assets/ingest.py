"""Ingestion assets: raw_metadata -> (cases, images, metadata_quarantine) -> image_files.

Thin on purpose: every rule lives in scin_pipeline.core; these functions read, call, and describe.

raw_metadata and image_files talk to the bucket, so they carry a retry policy; an error that no retry
can heal (a local filesystem error, bad metadata content, an object the source does not have, credentials
the source refuses) raises ``dagster.Failure(allow_retries=False)`` instead, so it fails at once rather
than after a minute.
"""

import dataclasses
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetOut,
    Backoff,
    Config,
    Failure,
    Jitter,
    MetadataValue,
    Output,
    RetryPolicy,
    asset,
    asset_check,
    multi_asset,
)
from pydantic import Field

from scin_pipeline.assets._metadata import table_md, versioned_output
from scin_pipeline.core import schema
from scin_pipeline.core.fetch import FetchRequest, FetchResult, fetch_images
from scin_pipeline.core.metadata import CASES_FILE, LABELS_FILE, parse_metadata, read_csv_bytes
from scin_pipeline.core.paths import CASES_OBJECT, LABELS_OBJECT
from scin_pipeline.core.raw import releases_in_csv, store_verbatim
from scin_pipeline.core.sources import CorruptObject, ObjectMissing, SourceAccessDenied, TransientSourceError
from scin_pipeline.resources import ScinSourceResource, StoragePaths
from scin_pipeline.resources.storage import local_fs_failure

GROUP = "ingest"

# Errors a later attempt may not meet: the source's transient and network errors, bytes damaged in
# transit. Checked first, since a ConnectionError is an OSError too.
CAN_HEAL = (TransientSourceError, ConnectionError, TimeoutError, CorruptObject)
# Errors every attempt meets again: bad content (ValueError covers UnicodeDecodeError, UnsafeObjectPath
# and the metadata parsers' named errors) and an object the source does not have.
CANNOT_HEAL = (ValueError, ObjectMissing)


@contextmanager
def retry_only_what_can_heal(asset_name: str) -> Iterator[None]:
    """Let the retry policy see only errors that a retry may heal; turn the others into a Failure that
    is not retried (local filesystem errors: see resources.storage.local_fs_failure)."""
    try:
        yield
    except SourceAccessDenied as exc:
        # A ConnectionError by kind (so in CAN_HEAL), but every retry would present the same credentials.
        raise Failure(
            description=f"{asset_name}: {exc} (not retried: a retry presents the same credentials)",
            allow_retries=False,
        ) from exc
    except (Failure, *CAN_HEAL):
        raise
    except Exception as exc:
        failure = local_fs_failure(asset_name, exc)
        if failure is not None:
            raise failure from None  # its description names what, where and why
        if isinstance(exc, CANNOT_HEAL):
            # from exc: the traceback shows where the content went wrong.
            raise Failure(
                description=f"{asset_name}: {type(exc).__name__}: {exc} (not retried: a retry reads the same content)",
                allow_retries=False,
            ) from exc
        raise


@asset(
    group_name=GROUP,
    kinds={"gcs", "csv"},
    code_version="1",
    # Exponential backoff with jitter (Dagster: (2^n - 1) x 5 s, +/- 5 s: about 5, 15, 35 s): the source's own
    # retries cover short blips; this covers an outage of about a minute, and jitter spreads parallel runs.
    retry_policy=RetryPolicy(max_retries=3, delay=5, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS),
    description="Verbatim scin_cases.csv and scin_labels.csv, stored by content hash, with the release id "
    "and the source object versions (generation, checksums).",
)
def raw_metadata(
    context: AssetExecutionContext, scin_source: ScinSourceResource, storage: StoragePaths
) -> Output[pd.DataFrame]:
    with retry_only_what_can_heal("raw_metadata"):
        return _raw_metadata(scin_source, storage)


def _raw_metadata(scin_source: ScinSourceResource, storage: StoragePaths) -> Output[pd.DataFrame]:
    source = scin_source.open()
    rows = []
    for object_path in (CASES_OBJECT, LABELS_OBJECT):
        data, info = source.read_bytes(object_path)
        local, digest = store_verbatim(data, Path(object_path).name, storage.raw_dir)
        rows.append(
            {
                "object_path": object_path,
                "file_name": Path(object_path).name,
                "local_path": storage.stored(local),  # relative to the data root
                "bytes": len(data),
                "sha256": digest,
                "crc32c": info.crc32c,
                "md5": info.md5,
                "generation": info.generation,
                "updated": info.updated,
                "release": ",".join(releases_in_csv(data)),
                "source_uri": source.uri,
                "synthetic": source.is_synthetic(),
            }
        )
    table = pd.DataFrame(rows)
    releases = sorted({r for value in table["release"] for r in value.split(",") if r})
    combined = hashlib.sha256("".join(table["sha256"]).encode()).hexdigest()
    return versioned_output(
        table,
        combined[:16],
        metadata={
            "source": source.uri,
            "synthetic_images": bool(table["synthetic"].any()),
            "release": ", ".join(releases) or "unknown",
            "sha256": MetadataValue.json(dict(zip(table["file_name"], table["sha256"]))),
            "generations": MetadataValue.json(dict(zip(table["file_name"], table["generation"].astype(str)))),
            "files": table_md(table, ["file_name", "bytes", "sha256", "generation"]),
        },
    )


@asset_check(asset=raw_metadata, blocking=True, description="Both CSVs are readable and carry every required column.")
def metadata_required_columns(raw_metadata: pd.DataFrame, storage: StoragePaths) -> AssetCheckResult:
    required = {CASES_FILE: schema.REQUIRED_CASE_COLUMNS, LABELS_FILE: schema.REQUIRED_LABEL_COLUMNS}
    problems = {}
    for row in raw_metadata.itertuples():
        file_name, local_path = cast(str, row.file_name), cast(str, row.local_path)
        data = storage.resolve(local_path).read_bytes()
        try:
            read_csv_bytes(file_name, data, required[file_name])
        except ValueError as exc:
            problems[file_name] = str(exc)
    return AssetCheckResult(
        passed=not problems,
        metadata={"problems": MetadataValue.json(problems)},
        description="; ".join(why if why.startswith(name) else f"{name}: {why}" for name, why in problems.items())
        or None,
    )


class CasesConfig(Config):
    limit_cases: int | None = Field(
        default=None, ge=1, description="keep a deterministic sample of N cases (None: all)"
    )
    sample_seed: int = Field(default=0, description="seed of the case sample")


@multi_asset(
    group_name=GROUP,
    outs={
        "cases": AssetOut(
            description="One typed row per case: demographics, self-reported and "
            "dermatologist FST, Monk skin tone, symptoms, textures, body parts, duration, "
            "parsed labels, gradability.",
            code_version="1",
            kinds={"pandas", "parquet"},
        ),
        "images": AssetOut(
            description="One row per image reference: image_id, case_id, position, "
            "shot type, object path; unsafe paths rejected with their reason.",
            code_version="1",
            kinds={"pandas", "parquet"},
        ),
        "metadata_quarantine": AssetOut(
            description="Every metadata row or value that was dropped, "
            "nulled or flagged, naming file, line, column and reason.",
            code_version="1",
            kinds={"pandas", "parquet"},
        ),
    },
    check_specs=[
        AssetCheckSpec(
            "case_id_unique",
            asset="cases",
            description="No case_id appears twice in either CSV (repeats are quarantined).",
        ),
        AssetCheckSpec(
            "labels_reference_known_cases",
            asset="cases",
            description="Every scin_labels.csv row belongs to a case of scin_cases.csv.",
        ),
        AssetCheckSpec(
            "label_literals_parse",
            asset="cases",
            description="Every label literal parses (ast.literal_eval) to the expected shape.",
        ),
        AssetCheckSpec(
            "enum_values_known",
            asset="cases",
            description="Enum columns hold only known values (unknown ones are kept and flagged).",
        ),
        AssetCheckSpec(
            "image_paths_safe",
            asset="images",
            description="Every image path is dataset/images/<signed int>.png; others are rejected and never opened.",
        ),
    ],
)
def parsed_metadata(
    context: AssetExecutionContext, config: CasesConfig, raw_metadata: pd.DataFrame, storage: StoragePaths
):
    files = {row.file_name: storage.resolve(cast(str, row.local_path)) for row in raw_metadata.itertuples()}
    parsed = parse_metadata(
        files[CASES_FILE].read_bytes(),
        files[LABELS_FILE].read_bytes(),
        limit_cases=config.limit_cases,
        sample_seed=config.sample_seed,
    )
    cases, images, quarantine = parsed.cases, parsed.images, parsed.quarantine
    synthetic = bool(raw_metadata["synthetic"].any())

    label_counts = cases["label_status"].value_counts().to_dict()
    yield Output(
        cases,
        output_name="cases",
        metadata={
            "dagster/row_count": len(cases),
            "labelled_cases": int(cases["has_label"].sum()),
            "label_status": MetadataValue.json({str(k): int(v) for k, v in label_counts.items()}),
            "limit_cases": config.limit_cases or "all",
            "synthetic_images": synthetic,
            "preview": table_md(
                cases,
                [
                    "case_id",
                    "age_group",
                    "sex_at_birth",
                    "fitzpatrick_skin_type",
                    "monk_skin_tone_label_us",
                    "top_label",
                    "label_status",
                ],
            ),
        },
    )
    yield Output(
        images,
        output_name="images",
        metadata={
            "dagster/row_count": len(images),
            "distinct_files": int(images["object_path"].nunique()),
            "shared_files": int(images.loc[images["n_references"] > 1, "object_path"].nunique()),
            "rejected_paths": int((images["path_status"] == "rejected").sum()),
            "preview": table_md(images, ["image_id", "case_id", "position", "shot_type", "object_path"]),
        },
    )
    yield Output(
        quarantine,
        output_name="metadata_quarantine",
        metadata={
            "dagster/row_count": len(quarantine),
            "by_action": MetadataValue.json(cast(dict[str, int], quarantine["action"].value_counts().to_dict())),
            "preview": table_md(quarantine, rows=25),
        },
    )

    def issues(predicate) -> pd.DataFrame:
        return quarantine[predicate(quarantine)]

    duplicate = issues(lambda q: q["reason"].str.startswith("duplicate case_id"))
    orphans = issues(lambda q: q["reason"].str.startswith("references a case not in"))
    malformed = issues(lambda q: q["reason"].str.startswith("labels not used"))
    unknown = issues(lambda q: q["action"].eq("flagged"))
    rejected = images[images["path_status"] == "rejected"]
    for name, asset_key, bad, severity in (
        ("case_id_unique", "cases", duplicate, AssetCheckSeverity.ERROR),
        ("labels_reference_known_cases", "cases", orphans, AssetCheckSeverity.WARN),
        ("label_literals_parse", "cases", malformed, AssetCheckSeverity.ERROR),
        ("enum_values_known", "cases", unknown, AssetCheckSeverity.WARN),
    ):
        yield AssetCheckResult(
            check_name=name,
            asset_key=asset_key,
            passed=bad.empty,
            severity=severity,
            metadata={"failures": len(bad), "examples": table_md(bad)},
            description=_first_rows(bad, len(bad)),
        )
    yield AssetCheckResult(
        check_name="image_paths_safe",
        asset_key="images",
        passed=rejected.empty,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "rejected": len(rejected),
            "examples": table_md(rejected, ["case_id", "position", "object_path", "path_reason"]),
        },
        description=None
        if rejected.empty
        else (
            f"{len(rejected)} image path(s) rejected, e.g. case {rejected['case_id'].iloc[0]} "
            f"{rejected['object_path'].iloc[0]!r}: {rejected['path_reason'].iloc[0]}"
        ),
    )


@asset(
    group_name=GROUP,
    kinds={"gcs", "png"},
    code_version="1",
    # Resumable (verified files are kept), so a retry fetches only what is still missing; about 10, 30, 70 s.
    retry_policy=RetryPolicy(max_retries=3, delay=10, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS),
    description="Local, verified copies of the images (size + CRC32C/MD5), fetched in parallel and "
    "resumably; status ok | missing | corrupt | rejected with a reason.",
)
def image_files(
    context: AssetExecutionContext, images: pd.DataFrame, scin_source: ScinSourceResource, storage: StoragePaths
) -> pd.DataFrame:
    with retry_only_what_can_heal("image_files"):
        return _image_files(context, images, scin_source, storage)


def _image_files(
    context: AssetExecutionContext, images: pd.DataFrame, scin_source: ScinSourceResource, storage: StoragePaths
) -> pd.DataFrame:
    source = scin_source.open()
    ok_refs = images[images["path_status"] == "ok"].drop_duplicates("object_path")
    requests = [FetchRequest(image_id=str(r.image_id), object_path=str(r.object_path)) for r in ok_refs.itertuples()]
    started = time.perf_counter()
    results = fetch_images(
        source,
        requests,
        storage.images_dir,
        quarantine_dir=storage.quarantine_dir("image_files"),
        workers=scin_source.download_workers,
        retries=scin_source.download_retries,
        progress=_progress_logger(context, len(requests)),
    )
    elapsed = time.perf_counter() - started
    rejected = images[images["path_status"] == "rejected"].drop_duplicates("object_path")
    # Rejected references were never opened; they are listed so that nothing is silently lost.
    rows = [dataclasses.asdict(r) for r in results] + [
        {
            "image_id": None,
            "object_path": r.object_path,
            "local_path": None,
            "bytes": None,
            "crc32c": None,
            "status": "rejected",
            "reason": r.path_reason,
            "fetched": False,
            "attempts": 0,
        }
        for r in rejected.itertuples()
    ]
    table = pd.DataFrame(rows, columns=list(FetchResult.__dataclass_fields__))
    table["local_path"] = table["local_path"].map(storage.stored_or_none)  # relative to the data root
    table["image_id"] = table["image_id"].astype("string")
    table["bytes"] = pd.to_numeric(table["bytes"]).astype("Int64")
    table["fetched"] = table["fetched"].astype(bool)
    table["status"] = pd.Categorical(table["status"], categories=["ok", "missing", "corrupt", "rejected"])
    counts = table["status"].value_counts().reindex(table["status"].cat.categories, fill_value=0)
    n_fetched = int(table["fetched"].sum())
    megabytes = float(table.loc[table["fetched"], "bytes"].sum() or 0) / 1e6
    context.add_output_metadata(
        {
            "status_counts": MetadataValue.json({cast(str, k): int(v) for k, v in counts.items()}),
            "fetched_now": n_fetched,
            "reused_verified": int(((table["status"] == "ok") & ~table["fetched"]).sum()),
            "total_mb": round(float(table["bytes"].sum() or 0) / 1e6, 2),
            "download_mb_per_s": round(megabytes / elapsed, 2) if n_fetched and elapsed > 0 else 0.0,
            "problems": table_md(table[table["status"] != "ok"], ["object_path", "status", "reason"], rows=25),
        }
    )
    return table


def _progress_logger(context: AssetExecutionContext, total: int):
    step = max(total // 10, 1)

    def report(done: int, _total: int) -> None:
        if done == total or done % step == 0:
            context.log.info(f"image_files: {done}/{total} objects processed")

    return report


def _first_rows(bad: pd.DataFrame, n: int) -> str | None:
    """A failed metadata check's reason in one line: how many rows, and the first one's file, line and why."""
    if bad.empty:
        return None
    first = bad.iloc[0]
    where = ", ".join(f"{c} {first[c]}" for c in ("file", "line", "case_id") if c in bad.columns and pd.notna(first[c]))
    return f"{n} row(s), e.g. {where}: {first.get('reason', '')}"


@asset_check(
    asset=image_files,
    description="Every referenced image is present and verified "
    "(missing, corrupt and rejected objects are listed; the run goes on without them).",
)
def image_files_verified(image_files: pd.DataFrame) -> AssetCheckResult:
    bad = image_files[image_files["status"] != "ok"]
    return AssetCheckResult(
        passed=bad.empty,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "not_ok": len(bad),
            "ok": int((image_files["status"] == "ok").sum()),
            "examples": table_md(bad, ["object_path", "status", "reason"], rows=25),
        },
        description=None
        if bad.empty
        else (
            f"{len(bad)} of {len(image_files)} image(s) not ok, e.g. {bad['object_path'].iloc[0]}: "
            f"{bad['status'].iloc[0]} ({bad['reason'].iloc[0]})"
        ),
    )

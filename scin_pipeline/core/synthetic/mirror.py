"""Write a synthetic mirror: the SCIN bucket's layout, the chosen or generated metadata, one drawn image
per image reference, the planted defects, and what was planted::

    <root>/dataset/scin_cases.csv        real rows (verbatim subset) or generated rows, same columns
    <root>/dataset/scin_labels.csv
    <root>/dataset/images/<int64>.png    one synthetic image per image reference
    <root>/SYNTHETIC_DATA.md             marker: its presence says "these images are not SCIN photographs"
    <root>/synthetic_plants.csv          ground truth of what was planted, one row per image file

A case's images take the skin colour of its Monk Skin Tone (US label, else India label, else tone 3, see
``metadata.case_monk_tone``) and the lesion pattern of its top weighted condition (``lesions``); what is
planted is described in ``defects``. Every file is written atomically (``core.atomic``): a reader never
sees half an image or half a CSV.

Columns of ``synthetic_plants.csv``: image_id, image_path, case_id (the first case referencing the file),
monk_tone and monk_tone_source (us / india / default) used for the skin colour, condition (top weighted
condition, '' when unlabelled), pattern (what the file actually shows: a near duplicate shows its source's
lesion, a dark frame ``none``, no file or an undecodable stub ''), planted, detail.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from scin_pipeline.core.atomic import atomic_target, remove_orphaned_temp_files, write_text_atomic
from scin_pipeline.core.paths import (
    CASES_OBJECT,
    IMAGE_PREFIX,
    LABELS_OBJECT,
    UnsafeObjectPath,
    image_id_from_path,
)
from scin_pipeline.core.schema import IMAGE_PATH_COLUMNS
from scin_pipeline.core.synthetic.defects import (
    PLANT_CLEAN,
    PLANT_MEANINGS,
    PLANT_REJECTED_PATH,
    ImageJob,
    image_bytes,
    plant_defects,
)
from scin_pipeline.core.synthetic.lesions import pattern_for_condition
from scin_pipeline.core.synthetic.metadata import (
    SYNTHETIC_RELEASE,
    case_monk_tone,
    generate_synthetic_metadata,
    select_case_ids,
    top_condition,
)

MARKER_FILE = "SYNTHETIC_DATA.md"
PLANTS_FILE = "synthetic_plants.csv"
DEFAULT_SYNTHETIC_CASES = 200
PLANTS_COLUMNS = (
    "image_id",
    "image_path",
    "case_id",
    "monk_tone",
    "monk_tone_source",
    "condition",
    "pattern",
    "planted",
    "detail",
)


@dataclass
class SyntheticMirror:
    """What write_synthetic_mirror wrote."""

    root: Path
    n_cases: int
    n_image_refs: int  # non-empty image_{1,2,3}_path cells of the written cases
    n_files_written: int  # files under dataset/images (a zero-byte or corrupt file counts, a missing one not)
    plants: pd.DataFrame = field(repr=False)  # one row per image file (and per rejected reference)


def _write_job(job: ImageJob) -> tuple[str, bool, str, str]:
    data, detail, drawn = image_bytes(job)
    if data is not None:
        # Atomic, without a sweep per file: the images folder was swept once before the jobs (a sweep lists
        # the folder, so one per file would cost O(files^2) on a full-size mirror).
        with atomic_target(Path(job.target), sweep=False) as tmp, open(tmp, "xb") as handle:
            handle.write(data)
    return job.image_id, data is not None, detail, drawn


def _read_metadata(metadata_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    metadata_dir = Path(metadata_dir)
    tables = []
    for obj in (CASES_OBJECT, LABELS_OBJECT):
        path = metadata_dir / Path(obj).name
        if not path.is_file():
            raise ValueError(
                f"metadata_dir {metadata_dir} lacks {Path(obj).name} (need scin_cases.csv and scin_labels.csv)"
            )
        # Strings only: case_id is a signed int64 that float parsing would corrupt, and "" must stay "".
        tables.append(pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8"))
    cases, labels = tables
    missing_cols = [c for c in ("case_id", *IMAGE_PATH_COLUMNS) if c not in cases.columns]
    if missing_cols:
        raise ValueError(f"{metadata_dir / Path(CASES_OBJECT).name} lacks columns {missing_cols}")
    if "case_id" not in labels.columns:
        raise ValueError(f"{metadata_dir / Path(LABELS_OBJECT).name} lacks column case_id")
    return cases, labels


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    # Minimal quoting and "\n" line ends: what the release itself uses, so unchanged rows round-trip.
    write_text_atomic(df.to_csv(index=False, lineterminator="\n"), path)


def _prepare_out_root(out_root: Path, overwrite: bool) -> None:
    if out_root.exists() and not out_root.is_dir():
        raise ValueError(f"out_root {out_root} exists and is not a directory")
    if out_root.exists() and any(out_root.iterdir()):
        if not overwrite:
            raise ValueError(f"out_root {out_root} is not empty; pass overwrite=True to replace a synthetic mirror")
        # Without the marker this could be a real SCIN mirror: never delete what might be real images.
        if not (out_root / MARKER_FILE).is_file():
            raise ValueError(f"refusing to overwrite {out_root}: it has no {MARKER_FILE}, so it may not be synthetic")
        for name in (MARKER_FILE, PLANTS_FILE, CASES_OBJECT, LABELS_OBJECT):
            (out_root / name).unlink(missing_ok=True)
        images_dir = out_root / IMAGE_PREFIX
        if images_dir.is_dir():
            for entry in images_dir.iterdir():
                try:
                    image_id_from_path(IMAGE_PREFIX + entry.name)
                except UnsafeObjectPath:
                    continue  # not a file this generator writes
                if entry.is_file() or entry.is_symlink():
                    entry.unlink()
    (out_root / IMAGE_PREFIX).mkdir(parents=True, exist_ok=True)
    remove_orphaned_temp_files(out_root / IMAGE_PREFIX)  # once for all the image writes (see _write_job)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_synthetic_mirror(
    out_root: Path,
    *,
    metadata_dir: Path | None = None,
    n_cases: int | None = None,
    seed: int = 0,
    image_size: tuple[int, int] = (480, 360),
    defect_rate: float = 0.04,
    overwrite: bool = False,
    workers: int = 1,
) -> SyntheticMirror:
    """Write a synthetic mirror of the SCIN bucket layout under out_root (see this module's docstring).

    metadata_dir: a folder with the real scin_cases.csv / scin_labels.csv; the chosen cases' rows are
    copied verbatim (n_cases None = all). None: metadata is generated (n_cases default 200).
    image_size is (width, height). workers > 1 renders images in a process pool; the output does not
    depend on it. out_root must be empty or absent; overwrite=True replaces a previous synthetic mirror
    (one holding MARKER_FILE) by deleting only what this function writes, and refuses any other folder.
    Raises ValueError on bad arguments or metadata, before anything is written.
    """
    out_root = Path(out_root)
    width, height = (int(v) for v in image_size)
    if width < 16 or height < 16:
        raise ValueError(f"image_size must be at least 16x16, got {image_size}")
    if not 0 <= defect_rate <= 1:
        raise ValueError(f"defect_rate must be within [0, 1], got {defect_rate}")

    # 1. Metadata: everything is read and checked before out_root is touched.
    if metadata_dir is not None:
        all_cases, all_labels = _read_metadata(Path(metadata_dir))
        chosen = set(select_case_ids(all_cases["case_id"].tolist(), n_cases, seed))
        cases = all_cases[all_cases["case_id"].isin(chosen)]
        labels = all_labels[all_labels["case_id"].isin(chosen)]
        source_text = (
            f"real SCIN metadata from `{Path(metadata_dir)}` (scin_cases.csv sha256 "
            f"{_file_digest(Path(metadata_dir) / Path(CASES_OBJECT).name)[:16]}..., scin_labels.csv sha256 "
            f"{_file_digest(Path(metadata_dir) / Path(LABELS_OBJECT).name)[:16]}...): the rows of "
            f"{len(chosen)} of {all_cases['case_id'].nunique()} cases, copied verbatim"
        )
    else:
        n_generated = DEFAULT_SYNTHETIC_CASES if n_cases is None else n_cases
        all_cases, all_labels = generate_synthetic_metadata(n_generated, seed)
        cases, labels = all_cases, all_labels
        source_text = f"synthetic metadata generated by scin-pipeline (release `{SYNTHETIC_RELEASE}`)"

    # Files the whole release shares between cases never carry a defect (their reuse is the plant).
    release_refs = all_cases[list(IMAGE_PATH_COLUMNS)].to_numpy().ravel()
    release_ref_counts = pd.Series(release_refs[release_refs != ""]).value_counts()
    shared_in_release = set(release_ref_counts[release_ref_counts > 1].index)

    label_by_case = labels.drop_duplicates("case_id").set_index("case_id")
    case_info: dict[str, tuple[int, str, str]] = {}
    for case_id in cases["case_id"]:
        row = label_by_case.loc[case_id] if case_id in label_by_case.index else None

        def get(col: str, row=row) -> str:
            return str(row[col]) if row is not None and col in row.index else ""

        tone, tone_source = case_monk_tone(get("monk_skin_tone_label_us"), get("monk_skin_tone_label_india"))
        case_info[case_id] = (tone, tone_source, top_condition(get("weighted_skin_condition_label")))

    # 2. Image references: validated, grouped per file (first referencing case owns the file's look).
    files: dict[str, dict] = {}
    plants_rows: list[dict] = []
    n_image_refs = 0
    for case_id, *paths in cases[["case_id", *IMAGE_PATH_COLUMNS]].itertuples(index=False):
        tone, tone_source, condition = case_info[case_id]
        for path in paths:
            if path == "":
                continue
            n_image_refs += 1
            try:
                image_id = image_id_from_path(path)
            except UnsafeObjectPath as err:
                plants_rows.append(
                    dict(
                        image_id="",
                        image_path=path,
                        case_id=case_id,
                        monk_tone=tone,
                        monk_tone_source=tone_source,
                        condition=condition,
                        pattern="",
                        planted=PLANT_REJECTED_PATH,
                        detail=err.reason,
                    )
                )
                continue
            if image_id in files:
                files[image_id]["other_cases"].append(case_id)
                continue
            files[image_id] = dict(
                image_id=image_id,
                image_path=path,
                case_id=case_id,
                monk_tone=tone,
                monk_tone_source=tone_source,
                condition=condition,
                pattern=pattern_for_condition(condition),
                planted=PLANT_CLEAN,
                detail="",
                other_cases=[],
            )

    # 3. Plants: exact reuse and the release's own missing file first, then seeded defects.
    plant_defects(files, seed=seed, defect_rate=defect_rate, shared_in_release=shared_in_release)

    # 4. Write.
    _prepare_out_root(out_root, overwrite)
    _write_csv(cases, out_root / CASES_OBJECT)
    _write_csv(labels, out_root / LABELS_OBJECT)
    images_dir = out_root / IMAGE_PREFIX
    jobs = []
    for info in files.values():
        source = files.get(info.get("source_id", ""))
        jobs.append(
            ImageJob(
                image_id=info["image_id"],
                target=str(images_dir / f"{info['image_id']}.png"),
                tone=info["monk_tone"],
                pattern=info["pattern"],
                planted=info["planted"],
                size=(width, height),
                seed=seed,
                source_id=source["image_id"] if source else "",
                source_tone=source["monk_tone"] if source else 0,
                source_pattern=source["pattern"] if source else "",
            )
        )
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_write_job, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    else:
        results = [_write_job(job) for job in jobs]
    n_files_written = 0
    for image_id, written, detail, drawn in results:
        info = files[image_id]
        n_files_written += written
        info["pattern"] = drawn  # what the file shows: a copy shows its source's lesion, a dark frame none
        if detail:
            info["detail"] = detail if not info["detail"] else f"{info['detail']}; {detail}"
        if info["planted"] == "near_duplicate":
            info["detail"] += f"; source_case_id={files[info['source_id']]['case_id']}"

    rows = [{col: info[col] for col in PLANTS_COLUMNS} for info in files.values()] + plants_rows
    plants = pd.DataFrame(rows, columns=list(PLANTS_COLUMNS))
    plants["monk_tone"] = plants["monk_tone"].astype(int)
    _write_csv(plants, out_root / PLANTS_FILE)
    write_text_atomic(
        _marker_text(
            plants,
            seed=seed,
            source_text=source_text,
            n_cases=len(cases),
            n_image_refs=n_image_refs,
            n_files_written=n_files_written,
            image_size=(width, height),
            defect_rate=defect_rate,
        ),
        out_root / MARKER_FILE,
    )
    return SyntheticMirror(
        root=out_root, n_cases=len(cases), n_image_refs=n_image_refs, n_files_written=n_files_written, plants=plants
    )


def _marker_text(
    plants: pd.DataFrame, *, seed, source_text, n_cases, n_image_refs, n_files_written, image_size, defect_rate
) -> str:
    counts = plants["planted"].value_counts()
    table = "\n".join(
        f"| `{kind}` | {int(counts.get(kind, 0))} | {meaning} |" for kind, meaning in PLANT_MEANINGS.items()
    )
    return f"""# SYNTHETIC DATA: these are not SCIN photographs

Every image under `dataset/images/` in this folder is SYNTHETIC. It was drawn by scin-pipeline
(`scin_pipeline.core.synthetic`): a skin-coloured background following the case's Monk skin tone plus a
drawn pattern chosen from the case's top condition label. These pictures are not photographs of anyone,
are not part of the SCIN dataset, and carry NO medical meaning: do not use them to learn, judge or
illustrate any skin condition. They exist only to exercise the pipeline offline.

- Metadata: {source_text}.
- Seed: {seed}. Cases: {n_cases}. Image references: {n_image_refs}. Files written: {n_files_written}.
- Image size: {image_size[0]} x {image_size[1]} px. Defect rate: {defect_rate}.

## What was planted

`{PLANTS_FILE}` lists every image file with what was planted in it (column `planted`), its case, the Monk
tone and the condition used to draw it, the pattern drawn, and details.

| planted | files | meaning |
| --- | --- | --- |
{table}
"""

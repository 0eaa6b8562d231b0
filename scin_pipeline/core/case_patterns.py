"""Unsupervised structure of every SCIN case, labelled or not: clusters of cases, how stable they are, and
who and what each cluster holds.

Why: 1,972 of SCIN 1.0.0's 5,033 cases carry no usable condition label and are used for nothing else; the
contributors' answers and photos still describe them. Clustering every case shows which kinds of
presentation exist, whether the unlabelled cases look like the labelled ones, and where deep skin tones
concentrate, before any label is spent.

Two views, each clustered on its own:

- **questionnaire**: the condition answers of ``core.metadata_model``'s encoding (the texture, body-part and
  symptom check boxes, and the one-hot duration and related category), 0/1 each. Demographics (age, sex,
  Fitzpatrick type, race) are deliberately NOT clustered on: a cluster should be a kind of presentation,
  and who falls in it is then read off its profile (age, sex, Monk tone) instead of being built in. Missing
  answers are not features either (a skipped question would otherwise define a cluster): a case that
  answered none of these questions is the explicit group ``no_answers`` (on the real release ~16 % of
  cases; clustered, they form one cluster of their own that only says "skipped the form").
- **image** (where a case has images with embeddings): the mean of its images' frozen-backbone embeddings,
  each dimension standardised (pooled ResNet stages differ in scale by orders of magnitude).

Method, per view: PCA to the fewest components that keep ``variance_kept`` of the variance (the map is
the first two); k-means (``n_init`` restarts, seeded) for every k in [``k_min``, ``k_max``]; **k is the one
with the highest mean silhouette** (on up to ``silhouette_sample`` cases, seeded; ties go to the smaller
k). Stability: ``n_bootstrap`` resamples of the cases with replacement, k-means with the chosen k refitted
on each and used to assign every case; the adjusted Rand index against the reference clustering (mean
and 2.5-97.5 % percentiles), and per cluster the mean Jaccard similarity of its best-matching bootstrap
cluster (Hennig's clusterwise stability: under 0.5 the cluster dissolves, above 0.75 it is stable). The
PCA is held fixed across resamples: stability is that of the clustering given the representation.
Clusters are numbered by size (Q1 / I1 the largest). Both views are compared by the adjusted Rand index
on the cases that are in both.

Rendering (maps, Markdown) is here too; matplotlib is imported where a figure is drawn.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, silhouette_score
from threadpoolctl import threadpool_limits

from scin_pipeline.core import schema
from scin_pipeline.core.metadata_model import FLAG_GROUPS, metadata_features
from scin_pipeline.core.rendering import markdown_text_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

QUESTIONNAIRE = "questionnaire"
IMAGE = "image"
VIEW_PREFIX = {QUESTIONNAIRE: "Q", IMAGE: "I"}
NO_ANSWERS = "no_answers"
# Categorical answers one-hot encoded as features (demographic answers are profiled, not clustered).
CONDITION_CATEGORICALS = ("condition_duration", "related_category")
LABEL_COLOURS_SHOWN = 8  # the most frequent labels get a colour on the label map; the rest are "other label"
UNLABELLED = "unlabelled"
OTHER_LABEL = "other label"
WEAK_K_SPREAD = 0.02  # silhouettes of every k within this of each other: the report says k is weakly determined
SYNTHETIC_IMAGES_NOTE = (
    "SYNTHETIC IMAGES: the image view clusters synthetic pictures and says nothing about skin conditions; "
    "the questionnaire view reads the real answers of the cases in this run"
)


@dataclass(frozen=True)
class PatternConfig:
    """How each view is clustered (see the module docstring)."""

    k_min: int = 2
    k_max: int = 10
    variance_kept: float = 0.8
    max_components: int = 30
    n_init: int = 10
    n_bootstrap: int = 50
    silhouette_sample: int = 3000
    min_cases: int = 10  # fewer cases than this in a view: it is not clustered (reported as such)
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.k_min <= self.k_max:
            raise ValueError(f"need 2 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        if not 0 < self.variance_kept <= 1:
            raise ValueError(f"variance_kept must be in (0, 1], got {self.variance_kept}")
        for name in ("max_components", "silhouette_sample", "min_cases"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        if self.n_init < 1 or self.n_bootstrap < 0:
            raise ValueError(f"n_init must be >= 1 and n_bootstrap >= 0, got {self.n_init}, {self.n_bootstrap}")


# ------------------------------------------------------------------------------------------- views


def questionnaire_columns() -> list[str]:
    """The encoded condition answers the questionnaire view clusters on (0/1 each)."""
    columns = [flag for flags in FLAG_GROUPS.values() for flag in flags]
    for column in CONDITION_CATEGORICALS:
        columns += [f"{column}={value}" for value in schema.ENUM_VALUES[column]]
    return columns


def questionnaire_features(cases: pd.DataFrame) -> pd.DataFrame:
    """(n cases, questionnaire_columns()) 0/1 float32, index kept from ``cases``."""
    return metadata_features(cases)[questionnaire_columns()]


def case_embeddings(
    embeddings: np.ndarray, image_rows: pd.DataFrame, case_ids: pd.Series
) -> tuple[np.ndarray, np.ndarray]:
    """Per case of ``case_ids``, the mean embedding of its images.

    ``image_rows``: one row per (image, case) reference with ``case_id`` and ``row`` (the image's row in
    ``embeddings``); a file shared by two cases counts for both. Returns (mask over ``case_ids``: the case
    has at least one embedded image, (n masked, D) float32 means in ``case_ids`` order)."""
    missing = {"case_id", "row"} - set(image_rows.columns)
    if missing:
        raise ValueError(f"image rows lack column(s) {sorted(missing)}")
    rows = image_rows[["case_id", "row"]].dropna()
    positions = rows["row"].to_numpy(dtype=np.int64)
    if len(positions) and (positions.min() < 0 or positions.max() >= len(embeddings)):
        raise ValueError(f"image rows point at embedding rows outside 0..{len(embeddings) - 1}")
    wanted = pd.Index(case_ids.astype(str))
    codes = wanted.get_indexer(pd.Index(rows["case_id"].astype(str)))
    keep = codes >= 0
    sums = np.zeros((len(wanted), embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, codes[keep], np.asarray(embeddings[positions[keep]], dtype=np.float64))
    counts = np.bincount(codes[keep], minlength=len(wanted))
    has = counts > 0
    return has, (sums[has] / counts[has, None]).astype(np.float32)


# ------------------------------------------------------------------------------------------ clustering


@dataclass
class ViewResult:
    """One view's clustering. ``labels`` are cluster names ("Q1"...), aligned with ``case_ids``; empty
    when the view was not clustered (``status`` says why)."""

    view: str
    status: str  # "clustered", or why not
    case_ids: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    labels: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    map_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    k: int = 0
    n_components: int = 0
    explained_variance: float = float("nan")  # kept by the n_components used to cluster
    map_variance: tuple[float, float] = (float("nan"), float("nan"))  # of the map's two axes
    selection: pd.DataFrame = field(default_factory=pd.DataFrame)  # k, silhouette, inertia, smallest cluster
    stability: dict = field(default_factory=dict)  # ari_mean, ari_low, ari_high, n_bootstrap
    cluster_stability: pd.DataFrame = field(default_factory=pd.DataFrame)  # cluster, n, jaccard_mean

    @property
    def silhouette(self) -> float:
        if self.selection.empty:
            return float("nan")
        return float(self.selection.loc[self.selection["k"] == self.k, "silhouette"].iloc[0])


def reduce_dimensions(features: np.ndarray, config: PatternConfig) -> tuple[np.ndarray, np.ndarray, PCA]:
    """PCA to the fewest components (>= 2) keeping ``variance_kept``: (reduced, 2-D map, fitted PCA)."""
    matrix = np.asarray(features, dtype=np.float64)
    n_fit = int(min(config.max_components, matrix.shape[1], len(matrix) - 1))
    if n_fit < 2:
        raise ValueError(f"need at least 2 features and 3 cases to reduce, got {matrix.shape}")
    pca = PCA(n_components=n_fit, random_state=config.seed).fit(matrix)
    cumulative = np.cumsum(pca.explained_variance_ratio_)
    n_keep = max(2, int(np.searchsorted(cumulative, config.variance_kept - 1e-12) + 1))
    n_keep = min(n_keep, n_fit)
    projected = pca.transform(matrix)
    return projected[:, :n_keep], projected[:, :2], pca


def _kmeans(k: int, seed: int, n_init: int) -> KMeans:
    # sklearn's stubs infer n_init's type from its "auto" default; an int is documented.
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed)  # pyright: ignore[reportArgumentType]


def choose_k(reduced: np.ndarray, config: PatternConfig) -> tuple[int, np.ndarray, pd.DataFrame]:
    """k-means for every k in [k_min, min(k_max, n - 1)]; the k with the highest mean silhouette (the first,
    i.e. smallest, on ties). Returns (k, its integer labels, the table k / silhouette / inertia /
    smallest_cluster)."""
    n = len(reduced)
    k_max = min(config.k_max, n - 1)
    if k_max < config.k_min:
        raise ValueError(f"{n} cases cannot be split into k_min={config.k_min} clusters")
    rows, fitted = [], {}
    sample = min(config.silhouette_sample, n)
    for k in range(config.k_min, k_max + 1):
        model = _kmeans(k, config.seed, config.n_init).fit(reduced)
        labels = np.asarray(model.labels_, dtype=np.int64)
        distinct = len(np.unique(labels))
        score = (
            float(silhouette_score(reduced, labels, sample_size=sample, random_state=config.seed))
            if 2 <= distinct < n
            else float("nan")
        )
        fitted[k] = labels
        rows.append(
            {
                "k": k,
                "silhouette": score,
                "inertia": float(np.asarray(model.inertia_)),
                "smallest_cluster": int(np.bincount(labels, minlength=k).min()),
            }
        )
    table = pd.DataFrame(rows)
    scores = table["silhouette"].to_numpy(dtype=float)
    if np.all(np.isnan(scores)):
        raise ValueError("no k gave two or more distinct clusters (all cases alike?)")
    best = int(table["k"].iloc[int(np.nanargmax(scores))])
    return best, fitted[best], table


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber integer clusters 0.. by decreasing size (ties by first appearance): deterministic names."""
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-counts[i], first[i]))
    mapping = {int(values[i]): rank for rank, i in enumerate(order)}
    return np.array([mapping[int(v)] for v in labels], dtype=np.int64)


def bootstrap_stability(
    reduced: np.ndarray, reference: np.ndarray, k: int, config: PatternConfig
) -> tuple[dict, np.ndarray]:
    """Adjusted Rand index of ``n_bootstrap`` refits (on resampled cases, assigning every case) against
    ``reference`` (integer labels 0..k-1), and each reference cluster's mean best-match Jaccard.

    Returns ({ari_mean, ari_low, ari_high, n_bootstrap}, per-cluster Jaccard means (k,))."""
    n = len(reduced)
    rng = np.random.default_rng(config.seed)
    aris, jaccards = [], []
    reference_sets = [reference == c for c in range(k)]
    for b in range(config.n_bootstrap):
        sample = rng.integers(0, n, n)
        if len(np.unique(reduced[sample], axis=0)) < k:
            continue  # a resample with fewer distinct cases than clusters cannot be fitted
        model = _kmeans(k, config.seed + 1 + b, config.n_init).fit(reduced[sample])
        assigned = model.predict(reduced)
        aris.append(adjusted_rand_score(reference, assigned))
        row = []
        for members in reference_sets:
            best = 0.0
            for c in np.unique(assigned):
                other = assigned == c
                union = np.count_nonzero(members | other)
                best = max(best, np.count_nonzero(members & other) / union if union else 0.0)
            row.append(best)
        jaccards.append(row)
    if not aris:
        return {"ari_mean": float("nan"), "ari_low": float("nan"), "ari_high": float("nan"), "n_bootstrap": 0}, (
            np.full(k, np.nan)
        )
    values = np.asarray(aris)
    summary = {
        "ari_mean": float(values.mean()),
        "ari_low": float(np.percentile(values, 2.5)),
        "ari_high": float(np.percentile(values, 97.5)),
        "n_bootstrap": len(values),
    }
    return summary, np.asarray(jaccards).mean(axis=0)


def cluster_view(view: str, case_ids, features: np.ndarray, config: PatternConfig) -> ViewResult:
    """Reduce, choose k, cluster and measure stability for one view (rows of ``features`` are the cases
    ``case_ids``)."""
    ids = np.asarray(case_ids, dtype=object)
    if len(ids) != len(features):
        raise ValueError(f"{view}: {len(ids)} case ids for {len(features)} feature rows")
    if len(ids) < config.min_cases:
        return ViewResult(view=view, status=f"not clustered: {len(ids)} cases (< min_cases {config.min_cases})")
    matrix = np.asarray(features, dtype=np.float64)
    if np.unique(matrix, axis=0).shape[0] < config.k_min:
        return ViewResult(view=view, status=f"not clustered: fewer than {config.k_min} distinct cases")
    reduced, map_xy, pca = reduce_dimensions(matrix, config)
    k, raw_labels, selection = choose_k(reduced, config)
    numbered = _by_size(raw_labels)
    stability, jaccard = bootstrap_stability(reduced, numbered, k, config)
    prefix = VIEW_PREFIX.get(view, view[:1].upper())
    names = np.array([f"{prefix}{i + 1}" for i in numbered], dtype=object)
    counts = np.bincount(numbered, minlength=k)
    cluster_stability = pd.DataFrame(
        {"cluster": [f"{prefix}{i + 1}" for i in range(k)], "n_cases": counts, "jaccard_mean": jaccard}
    )
    ratios = pca.explained_variance_ratio_
    return ViewResult(
        view=view,
        status="clustered",
        case_ids=ids,
        labels=names,
        map_xy=map_xy,
        k=k,
        n_components=reduced.shape[1],
        explained_variance=float(ratios[: reduced.shape[1]].sum()),
        map_variance=(float(ratios[0]), float(ratios[1])),
        selection=selection,
        stability=stability,
        cluster_stability=cluster_stability,
    )


# ------------------------------------------------------------------------------------------ profiles

PROFILE_COLUMNS = ["view", "cluster", "n_cases", "facet", "value", "n", "share", "share_view", "lift"]
FLAG_FACETS = {"texture": "textures_", "body_part": "body_parts_", "symptom": ""}


def _flag_facets() -> dict[str, list[str]]:
    return {"texture": schema.TEXTURE_COLUMNS, "body_part": schema.BODY_PART_COLUMNS, "symptom": schema.SYMPTOM_COLUMNS}


def _flag_name(facet: str, column: str) -> str:
    prefix = FLAG_FACETS[facet]
    return column.removeprefix(prefix) if prefix else column


def profile_attributes(cases: pd.DataFrame) -> pd.DataFrame:
    """The categorical facets of a profile, one string column each (missing -> "missing"): duration, related
    category, age group, sex, Monk tone bins (US, India), Fitzpatrick bins (self, dermatologist), label
    status, and the label (top weighted condition; "unlabelled" for a case without one)."""
    from scin_pipeline.core.fairness import sensitive_features

    sensitive = sensitive_features(cases)

    def text(column: str) -> pd.Series:
        if column not in cases:
            return pd.Series(schema.MISSING_GROUP, index=cases.index, dtype=object)
        values = cases[column].astype(object)
        return values.where(values.notna(), schema.MISSING_GROUP).astype(str).replace("", schema.MISSING_GROUP)

    has_label = (
        cases["has_label"].fillna(False).astype(bool) if "has_label" in cases else text("top_label").ne("missing")
    )
    label = text("top_label").where(has_label, UNLABELLED)
    return pd.DataFrame(
        {
            "duration": text("condition_duration"),
            "related_category": text("related_category"),
            "age_group": sensitive["age_group"],
            "sex_at_birth": sensitive["sex_at_birth"],
            "monk_us_bin": sensitive["monk_us_bin"],
            "monk_india_bin": sensitive["monk_india_bin"],
            "fst_self_reported_bin": sensitive["fst_self_reported_bin"],
            "fst_dermatologist_bin": sensitive["fst_dermatologist_bin"],
            "label_status": text("label_status"),
            "label": label,
        },
        index=cases.index,
    )


def cluster_profiles(view: str, cases: pd.DataFrame, clusters: pd.Series) -> pd.DataFrame:
    """Long table (PROFILE_COLUMNS) of each cluster of one view: per check box the share of its cases that
    ticked it, per categorical facet the share in each group, and for ``label`` the share among its
    LABELLED members (the label composition). ``share_view`` is the same share over every case of the view
    (all clusters together) and ``lift`` = share / share_view. ``clusters``: cluster name per case, aligned
    with ``cases``' index; a case with no cluster (None) is not in this view."""
    in_view = clusters.notna().to_numpy()
    view_cases = cases.loc[in_view]
    names = clusters[in_view].astype(str)
    attributes = profile_attributes(view_cases)
    flags = {
        facet: view_cases.reindex(columns=columns).fillna(False).astype(bool)
        for facet, columns in _flag_facets().items()
    }
    labelled = attributes["label"].ne(UNLABELLED)

    def shares(frame_mask: np.ndarray) -> list[dict]:
        out = []
        for facet, ticks in flags.items():
            part = ticks.loc[frame_mask]
            for column in ticks.columns:
                out.append(
                    {"facet": facet, "value": _flag_name(facet, column), "n": int(part[column].sum()), "of": len(part)}
                )
        for facet in attributes.columns:
            mask = frame_mask & labelled.to_numpy() if facet == "label" else frame_mask
            counts = attributes.loc[mask, facet].value_counts()
            for value, n in counts.items():
                out.append({"facet": facet, "value": str(value), "n": int(n), "of": int(mask.sum())})
        return out

    everyone = pd.DataFrame(shares(np.ones(len(view_cases), dtype=bool)))
    everyone["share_view"] = everyone["n"] / everyone["of"].where(everyone["of"] > 0)
    overall = everyone.set_index(["facet", "value"])["share_view"]
    parts = []
    for name in _natural(names.unique()):
        mask = (names == name).to_numpy()
        part = pd.DataFrame(shares(mask))
        if part.empty:
            continue
        part["share"] = part["n"] / part["of"].where(part["of"] > 0)
        part["share_view"] = overall.reindex(pd.MultiIndex.from_frame(part[["facet", "value"]])).to_numpy()
        part["lift"] = part["share"] / part["share_view"].where(part["share_view"] > 0)
        parts.append(part.assign(view=view, cluster=name, n_cases=int(mask.sum())))
    if not parts:
        return pd.DataFrame(columns=PROFILE_COLUMNS)
    table = pd.concat(parts, ignore_index=True)
    return table[PROFILE_COLUMNS]


def _natural(names) -> list[str]:
    """Cluster names in order: Q1, Q2, ..., Q10, then the named groups (no_answers)."""

    def key(name: str):
        digits = name[1:]
        return (0, int(digits), "") if digits.isdigit() else (1, 0, name)

    return sorted((str(n) for n in names), key=key)


# ------------------------------------------------------------------------------------------ the whole


@dataclass
class CasePatterns:
    """Everything ``find_case_patterns`` found.

    assignments  one row per case: case_id, has_label, label_status, label, answered, n_answers (condition
                 answers given),
                 questionnaire_cluster ("Q1".., "no_answers"), questionnaire_x/_y (map), has_images,
                 image_cluster ("I1".., None without images), image_x/_y
    views        view name -> ViewResult
    profiles     cluster_profiles of every clustered view, concatenated
    cross_view_ari  adjusted Rand index of the two views on the cases in both (NaN when not computable)
    cross_view   contingency table (questionnaire cluster x image cluster) of those cases
    """

    assignments: pd.DataFrame
    views: dict[str, ViewResult]
    profiles: pd.DataFrame
    cross_view_ari: float = float("nan")
    cross_view: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> pd.DataFrame:
        """One row per view: status, cases, k, silhouette, components, stability (ARI mean and interval), and
        ``label_ami``: how much a labelled case's cluster says about its label (adjusted mutual information
        over the view's labelled cases; 0 = no more than chance, 1 = the clusters are the labels)."""
        rows = []
        for name, view in self.views.items():
            column = self.assignments[f"{name}_cluster"]
            labelled = self.assignments["has_label"].to_numpy(dtype=bool) & column.notna().to_numpy()
            if name == QUESTIONNAIRE:
                labelled &= (column != NO_ANSWERS).to_numpy()
            ami = (
                float(adjusted_mutual_info_score(self.assignments.loc[labelled, "label"], column[labelled]))
                if view.status == "clustered" and labelled.sum() >= 2
                else float("nan")
            )
            rows.append(
                {
                    "view": name,
                    "status": view.status,
                    "cases": len(view.case_ids),
                    "k": view.k,
                    "silhouette": view.silhouette,
                    "pca_components": view.n_components,
                    "variance_kept": view.explained_variance,
                    "bootstrap_ari_mean": view.stability.get("ari_mean", float("nan")),
                    "bootstrap_ari_low": view.stability.get("ari_low", float("nan")),
                    "bootstrap_ari_high": view.stability.get("ari_high", float("nan")),
                    "n_bootstrap": view.stability.get("n_bootstrap", 0),
                    "label_ami": ami,
                }
            )
        return pd.DataFrame(rows)


ASSIGNMENT_COLUMNS = [
    "case_id",
    "has_label",
    "label_status",
    "label",
    "answered",
    "n_answers",
    "questionnaire_cluster",
    "questionnaire_x",
    "questionnaire_y",
    "has_images",
    "image_cluster",
    "image_x",
    "image_y",
]


def find_case_patterns(
    cases: pd.DataFrame,
    config: PatternConfig = PatternConfig(),
    *,
    embeddings: np.ndarray | None = None,
    image_rows: pd.DataFrame | None = None,
) -> CasePatterns:
    """Cluster every case of ``cases`` on its questionnaire answers and, when ``embeddings`` and
    ``image_rows`` (one row per image reference: case_id, row in ``embeddings``) are given, on its images;
    profile every cluster. Deterministic for a given config (seeded).

    The k-means fits run single-threaded: they are small (thousands of rows, tens of columns), where
    OpenMP's threads cost more than they give, and far more on a loaded host (one k-means fit of the real
    release, n_init 10, on the 2-core development machine under load: 7.3 s with threads, 0.24 s without).
    """
    with threadpool_limits(limits=1):
        return _find_case_patterns(cases, config, embeddings, image_rows)


def _find_case_patterns(
    cases: pd.DataFrame, config: PatternConfig, embeddings: np.ndarray | None, image_rows: pd.DataFrame | None
) -> CasePatterns:
    if "case_id" not in cases:
        raise ValueError("cases lacks the column 'case_id'")
    if cases["case_id"].astype(str).duplicated().any():
        duplicated = cases.loc[cases["case_id"].astype(str).duplicated(), "case_id"].iloc[0]
        raise ValueError(f"cases has case_id {duplicated} more than once")
    frame = cases.reset_index(drop=True)
    case_ids = frame["case_id"].astype(str)
    attributes = profile_attributes(frame)
    answers = questionnaire_features(frame)
    n_answers = answers.to_numpy().sum(axis=1).astype(np.int64)
    answered = n_answers > 0
    assignments = pd.DataFrame(
        {
            "case_id": case_ids,
            "has_label": attributes["label"].ne(UNLABELLED).to_numpy(),
            "label_status": attributes["label_status"].to_numpy(),
            "label": attributes["label"].to_numpy(),
            "answered": answered,
            "n_answers": n_answers,
        }
    )
    views: dict[str, ViewResult] = {}
    q = cluster_view(QUESTIONNAIRE, case_ids[answered].to_numpy(), answers.to_numpy()[answered], config)
    views[QUESTIONNAIRE] = q
    q_cluster = pd.Series(None, index=frame.index, dtype=object)
    q_cluster[~answered] = NO_ANSWERS
    q_xy = np.full((len(frame), 2), np.nan)
    if q.status == "clustered":
        q_cluster[answered] = q.labels
        q_xy[answered] = q.map_xy
    assignments["questionnaire_cluster"] = q_cluster.to_numpy()
    assignments["questionnaire_x"], assignments["questionnaire_y"] = q_xy[:, 0], q_xy[:, 1]

    has_images = np.zeros(len(frame), dtype=bool)
    i_cluster = pd.Series(None, index=frame.index, dtype=object)
    i_xy = np.full((len(frame), 2), np.nan)
    if embeddings is not None and image_rows is not None:
        has_images, means = case_embeddings(embeddings, image_rows, case_ids)
        spread = means.std(axis=0)
        standardised = (means - means.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
        image_view = cluster_view(IMAGE, case_ids[has_images].to_numpy(), standardised, config)
        views[IMAGE] = image_view
        if image_view.status == "clustered":
            i_cluster[has_images] = image_view.labels
            i_xy[has_images] = image_view.map_xy
    assignments["has_images"] = has_images
    assignments["image_cluster"] = i_cluster.to_numpy()
    assignments["image_x"], assignments["image_y"] = i_xy[:, 0], i_xy[:, 1]

    profiles = [cluster_profiles(QUESTIONNAIRE, frame, q_cluster)] if q_cluster.notna().any() else []
    if i_cluster.notna().any():
        profiles.append(cluster_profiles(IMAGE, frame, i_cluster))
    both = assignments["questionnaire_cluster"].notna() & assignments["image_cluster"].notna()
    both &= assignments["questionnaire_cluster"].ne(NO_ANSWERS)
    cross_ari, cross = float("nan"), pd.DataFrame()
    if both.sum() >= 2:
        qa, ia = assignments.loc[both, "questionnaire_cluster"], assignments.loc[both, "image_cluster"]
        cross_ari = float(adjusted_rand_score(qa, ia))
        cross = pd.crosstab(qa, ia).reindex(index=_natural(qa.unique()), columns=_natural(ia.unique()))
    return CasePatterns(
        assignments=assignments[ASSIGNMENT_COLUMNS],
        views=views,
        profiles=pd.concat(profiles, ignore_index=True) if profiles else pd.DataFrame(columns=PROFILE_COLUMNS),
        cross_view_ari=cross_ari,
        cross_view=cross,
    )


# ------------------------------------------------------------------------------------------ rendering


def _figure(width: float, height: float) -> Figure:
    # Figure, not pyplot: no global registry, no GUI backend, safe in threaded executors (as core.report).
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def map_png(patterns: CasePatterns, view: str, colour_by: str, *, title_note: str = "") -> bytes | None:
    """The view's 2-D PCA map of its cases, coloured by ``colour_by``: "cluster" or "label" (the
    LABEL_COLOURS_SHOWN most frequent labels, the others as "other label", unlabelled cases in grey,
    drawn first so labelled ones stay visible). None when the view was not clustered."""
    if colour_by not in ("cluster", "label"):
        raise ValueError(f"colour_by must be 'cluster' or 'label', got {colour_by!r}")
    result = patterns.views.get(view)
    if result is None or result.status != "clustered":
        return None
    table = patterns.assignments
    placed = table[table[f"{view}_cluster"].notna() & table[f"{view}_x"].notna()]
    if colour_by == "cluster":
        groups = placed[f"{view}_cluster"].astype(str)
        order = _natural(groups.unique())
    else:
        labels = placed["label"].astype(str)
        top = labels[labels != UNLABELLED].value_counts().index[:LABEL_COLOURS_SHOWN].tolist()
        groups = labels.where(labels.isin(top) | (labels == UNLABELLED), OTHER_LABEL)
        order = [UNLABELLED] + top + ([OTHER_LABEL] if (groups == OTHER_LABEL).any() else [])
    figure = _figure(7.5, 5.5)
    axis = figure.add_subplot()
    palette = _palette(len(order))
    for i, group in enumerate(order):
        part = placed[groups.to_numpy() == group]
        if part.empty:
            continue
        colour = (0.75, 0.75, 0.75, 0.5) if group == UNLABELLED else palette[i]
        axis.scatter(
            part[f"{view}_x"], part[f"{view}_y"], s=6, color=colour, label=f"{group} ({len(part):,})", linewidths=0
        )
    var1, var2 = result.map_variance
    axis.set_xlabel(f"PC1 ({var1:.0%} of variance)")
    axis.set_ylabel(f"PC2 ({var2:.0%} of variance)")
    axis.set_title(f"{view} view: cases coloured by {colour_by}{title_note}", fontsize=10)
    axis.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _png(figure)


def _palette(n: int) -> list:
    from matplotlib import colormaps

    colours = colormaps["tab10" if n <= 10 else "tab20"]
    return [colours(i % colours.N) for i in range(n)]


def map_pngs(patterns: CasePatterns, *, title_note: str = "") -> dict[str, bytes]:
    """Every map: "<view>_by_<cluster|label>" -> PNG bytes, for the clustered views."""
    out = {}
    for view in patterns.views:
        for colour_by in ("cluster", "label"):
            png = map_png(patterns, view, colour_by, title_note=title_note)
            if png is not None:
                out[f"{view}_by_{colour_by}"] = png
    return out


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.3f}"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return str(value)


def _pct(value: float) -> str:
    return f"{value:.0%}" if np.isfinite(value) else "-"


def cluster_summary(patterns: CasePatterns, view: str, *, top_answers: int = 4, top_labels: int = 3) -> pd.DataFrame:
    """One row per cluster of ``view``: size, share labelled, Monk US 7-10 share, the mean number of condition
    answers given, the answers that most set it apart (ticked by >= 25 % of its cases and more often than in
    the whole view, by lift), its most common duration, and its most common labels among its labelled
    members."""
    profile = patterns.profiles[patterns.profiles["view"] == view]
    if profile.empty:
        return pd.DataFrame()
    answers_given = patterns.assignments.groupby(f"{view}_cluster")["n_answers"].mean()
    total = profile.groupby("cluster")["n_cases"].first().sum()
    rows = []
    for cluster in _natural(profile["cluster"].unique()):
        part = profile[profile["cluster"] == cluster]
        n = int(part["n_cases"].iloc[0])
        flags = part[part["facet"].isin(list(FLAG_FACETS)) & (part["share"] >= 0.25) & (part["lift"] > 1)].sort_values(
            ["lift", "share"], ascending=False
        )
        answers = ", ".join(f"{r.value} {r.share:.0%} (x{r.lift:.1f})" for r in flags.head(top_answers).itertuples())
        duration = part[part["facet"] == "duration"].sort_values("share", ascending=False).head(1)
        labels = part[part["facet"] == "label"].sort_values(["n", "value"], ascending=[False, True])
        status = part[part["facet"] == "label_status"].set_index("value")["n"]
        deep = part[(part["facet"] == "monk_us_bin") & (part["value"] == "7-10")]["share"]
        rows.append(
            {
                "cluster": cluster,
                "cases": n,
                "share of cases": n / total if total else float("nan"),
                "labelled": int(status.get("labelled", 0)) / n if n else float("nan"),
                "Monk US 7-10": float(deep.iloc[0]) if len(deep) else 0.0,
                "answers given (mean)": f"{float(answers_given.get(cluster, float('nan'))):.1f}",
                "answers that set it apart (share, lift)": answers or "-",
                "commonest duration": (
                    f"{duration['value'].iloc[0]} {duration['share'].iloc[0]:.0%}" if len(duration) else "-"
                ),
                "commonest labels (of labelled members)": ", ".join(
                    f"{r.value} {r.share:.0%}" for r in labels.head(top_labels).itertuples()
                )
                or "-",
            }
        )
    return pd.DataFrame(rows)


def _distribution(part: pd.DataFrame, facet: str, *, top: int | None = None) -> str:
    rows = part[part["facet"] == facet].sort_values(["share", "value"], ascending=[False, True])
    if top is not None:
        rows = rows.head(top)
    return ", ".join(f"{r.value} {r.share:.0%}" for r in rows.itertuples()) or "-"


def findings(patterns: CasePatterns, view: str) -> list[str]:
    """What the clustering of ``view`` says, computed (so a rerun on other data states its own): stability,
    how much the clusters say about the label, whether unlabelled cases and deep skin tones concentrate in
    some clusters."""
    result = patterns.views.get(view)
    if result is None or result.status != "clustered":
        return []
    out = []
    jaccard = result.cluster_stability.set_index("cluster")["jaccard_mean"]
    stable = [str(c) for c, v in jaccard.items() if v >= 0.75]
    dissolving = [str(c) for c, v in jaccard.items() if v < 0.5]
    ari = result.stability.get("ari_mean", float("nan"))
    out.append(
        f"Stability: bootstrap ARI {ari:.2f}; {len(stable)} of {result.k} clusters recur in resamples "
        f"(Jaccard >= 0.75: {', '.join(stable) or 'none'})"
        + (f", {', '.join(dissolving)} dissolve (< 0.5)" if dissolving else "")
        + "."
    )
    ami = float(patterns.summary().set_index("view")["label_ami"].astype(float)[view])
    if np.isfinite(ami):
        strength = "little" if ami < 0.1 else "some" if ami < 0.3 else "much"
        out.append(
            f"Labels: adjusted mutual information of cluster and label {ami:.3f}: a labelled case's cluster says "
            f"{strength} about its condition."
        )
    table = patterns.assignments[patterns.assignments[f"{view}_cluster"].notna()]
    by_cluster = table.groupby(f"{view}_cluster")
    labelled = by_cluster["has_label"].mean()
    overall = float(table["has_label"].mean())
    out.append(
        f"Unlabelled cases: the labelled share per cluster runs from {labelled.min():.0%} ({labelled.idxmin()}) to "
        f"{labelled.max():.0%} ({labelled.idxmax()}) against {overall:.0%} overall"
        + (
            ": no cluster is made mostly of unlabelled cases, so the unlabelled cases look like the labelled ones "
            "on this view."
            if labelled.min() >= 0.5
            else "."
        )
    )
    profile = patterns.profiles[(patterns.profiles["view"] == view) & (patterns.profiles["facet"] == "monk_us_bin")]
    deep = (
        profile[profile["value"] == "7-10"]
        .set_index("cluster")["share"]
        .reindex(_natural(table[f"{view}_cluster"].unique()))
    )
    deep = deep.fillna(0.0)
    view_deep = (
        float(profile.loc[profile["value"] == "7-10", "share_view"].iloc[0])
        if (profile["value"] == "7-10").any()
        else 0.0
    )
    out.append(
        f"Deep skin tones: US Monk 7-10 is {deep.min():.1%} ({deep.idxmin()}) to {deep.max():.1%} ({deep.idxmax()}) "
        f"of a cluster's cases, against {view_deep:.1%} of the view."
    )
    return out


def _k_note(view: ViewResult) -> str:
    scores = view.selection["silhouette"].to_numpy(dtype=float)
    spread = float(np.nanmax(scores) - np.nanmin(scores)) if len(scores) > 1 else float("nan")
    if np.isfinite(spread) and spread < WEAK_K_SPREAD:
        return (
            f" Every k tried scores within {spread:.3f} of the others: the number of clusters is weakly "
            "determined, and the clusters are best read as a partition of a continuum (their stability, "
            "below, says which of them recur)."
        )
    return ""


def patterns_markdown(
    patterns: CasePatterns,
    *,
    title: str = "Case patterns",
    intro: str = "",
    synthetic_images: bool = False,
    plots: dict[str, str] | None = None,
) -> str:
    """The report: the method, per view the choice of k, the stability, the cluster summary and each
    cluster's profile, the cross-view agreement; ``plots`` (name -> file or data URI) embedded where their
    view is discussed."""
    plots = plots or {}
    lines = [f"# {title}", ""]
    if synthetic_images and IMAGE in patterns.views:
        lines += [f"**{SYNTHETIC_IMAGES_NOTE}.**", ""]
    if intro:
        lines += [intro, ""]
    table = patterns.assignments
    n_no_answers = int((table["questionnaire_cluster"] == NO_ANSWERS).sum())
    lines += [
        f"{len(table):,} cases: {int(table['has_label'].sum()):,} labelled, {int((~table['has_label']).sum()):,} "
        f"without a usable condition label; {n_no_answers:,} answered none of the condition questions "
        f"(group `{NO_ANSWERS}`); {int(table['has_images'].sum()):,} with embedded images.",
        "",
        "Method (`scin_pipeline/core/case_patterns.py`): the questionnaire view clusters the condition answers "
        "(texture, body-part and symptom check boxes, duration and related category, one-hot) - never "
        "demographics, which are read off each cluster's profile instead; the image view clusters the mean "
        "standardised embedding of a case's images. Per view: PCA to the fewest components keeping the stated "
        "share of variance, k-means for each k in the range, **k = the highest mean silhouette**; stability by "
        "bootstrap (cases resampled, k-means refitted, every case reassigned): adjusted Rand index against the "
        "reference, and per cluster the mean Jaccard of its best match (under 0.5: dissolves; over 0.75: "
        "stable). `label_ami`: adjusted mutual information of cluster and label over the labelled cases (0: the "
        "cluster says no more about the label than chance).",
        "",
    ]
    summary = patterns.summary()
    shown = summary.assign(
        **{
            "bootstrap ARI [2.5 %, 97.5 %]": [
                f"{mean:.3f} [{low:.3f}, {high:.3f}]" if np.isfinite(mean) else "-"
                for mean, low, high in summary[["bootstrap_ari_mean", "bootstrap_ari_low", "bootstrap_ari_high"]]
                .to_numpy(dtype=float)
                .tolist()
            ]
        }
    )[
        [
            "view",
            "status",
            "cases",
            "k",
            "silhouette",
            "pca_components",
            "variance_kept",
            "bootstrap ARI [2.5 %, 97.5 %]",
            "n_bootstrap",
            "label_ami",
        ]
    ]
    lines += [markdown_text_table(shown, _fmt), ""]
    for name, view in patterns.views.items():
        lines += [f"## The {name} view", ""]
        if view.status != "clustered":
            lines += [f"{view.status}.", ""]
            continue
        lines += [
            f"{len(view.case_ids):,} cases; PCA to {view.n_components} components ({view.explained_variance:.0%} "
            f"of the variance); k = {view.k} (mean silhouette {view.silhouette:.3f}; a silhouette under 0.25 "
            "means the clusters overlap: they are regions of a continuum rather than separate groups)." + _k_note(view),
            "",
            "Choice of k (every k tried):",
            "",
            markdown_text_table(view.selection, _fmt),
            "",
            f"Stability over {view.stability.get('n_bootstrap', 0)} bootstrap refits: adjusted Rand index "
            f"{view.stability.get('ari_mean', float('nan')):.3f} "
            f"[{view.stability.get('ari_low', float('nan')):.3f}, {view.stability.get('ari_high', float('nan')):.3f}].",
            "",
        ]
        for colour_by in ("cluster", "label"):
            key = f"{name}_by_{colour_by}"
            if key in plots:
                lines += [f"![{key}]({plots[key]})", ""]
        lines += [f"- {finding}" for finding in findings(patterns, name)] + [""]
        clusters = cluster_summary(patterns, name)
        stability = view.cluster_stability.set_index("cluster")["jaccard_mean"]
        clusters.insert(2, "bootstrap Jaccard", [stability.get(c, float("nan")) for c in clusters["cluster"]])
        lines += [
            "Clusters (shares of the cluster's cases; lift = that share over the view's; labels: share of the "
            "cluster's labelled members):",
            "",
            markdown_text_table(clusters, lambda v: _pct(v) if isinstance(v, float) and 0 <= v <= 1 else _fmt(v)),
            "",
        ]
        profile = patterns.profiles[patterns.profiles["view"] == name]
        rows = []
        for cluster in _natural(profile["cluster"].unique()):
            part = profile[profile["cluster"] == cluster]
            rows.append(
                {
                    "cluster": cluster,
                    "age group": _distribution(part, "age_group", top=3),
                    "sex at birth": _distribution(part, "sex_at_birth"),
                    "Monk US bins": _distribution(part, "monk_us_bin"),
                    "Monk India bins": _distribution(part, "monk_india_bin"),
                    "label status": _distribution(part, "label_status"),
                }
            )
        lines += ["Who is in each cluster:", "", markdown_text_table(pd.DataFrame(rows)), ""]
    if patterns.cross_view.size:
        lines += [
            "## Do the two views agree?",
            "",
            f"On the {int(patterns.cross_view.to_numpy().sum()):,} cases in both views (answered, with images): "
            f"adjusted Rand index {patterns.cross_view_ari:.3f} (0: no more agreement than chance, 1: identical).",
            "",
            markdown_text_table(
                patterns.cross_view.reset_index().rename(columns={"questionnaire_cluster": "questionnaire \\ image"}),
                _fmt,
            ),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"

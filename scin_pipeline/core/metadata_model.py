"""A metadata-only classifier for the most frequent SCIN conditions: how well the contributor's own answers
(symptoms, body parts, textures, duration, age group, sex, ...) predict the dermatologists' condition labels.

Why: no image is reachable offline, so this is the one real model figure the project can produce; it is
also a floor for any image model (one that cannot beat the questionnaire has learnt nothing from the pixels).

Multi-label task: the 10 conditions that are most often a case's highest-weighted label
(``top_k_classes``, ``rank_by="top_label"``), one 0/1 target per condition (1 when the dermatologists named
it at all); every labelled case is a row, cases naming none of the 10 as all-negative rows. Features:
``METADATA_FEATURE_COLUMNS`` (90; race/ethnicity is deliberately not one). Models: ``BASELINE_CONFIG``
(logistic regression, C=1) and ``CHOSEN_CONFIG`` (logistic regression, C=0.03, averaged with 150 boosted
stumps). Single label: ``fit_single_label_metadata_model`` is the pipeline's ``metadata_model`` asset (one
class per case, as the image models): the same configuration as a multinomial logistic regression averaged
with multiclass boosted stumps, class-balanced sample weights.

The task definitions and models tried, how the choice was made, and the results on the real release (test
mean AUC 0.686 for the chosen model, 0.670 for the baseline; the 0.72 target is not reached) are in
``docs/results/metadata_model.md``; ``bench/metadata_model_real.py`` reproduces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, cast

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.utils.class_weight import compute_sample_weight

from scin_pipeline.core import schema
from scin_pipeline.core.questionnaire import blank_questionnaires, check_questionnaire_dropout
from scin_pipeline.core.splits import OTHER

# Check-box answers, used as 0/1 as they are.
FLAG_GROUPS: dict[str, list[str]] = {
    "textures": schema.TEXTURE_COLUMNS,
    "body_parts": schema.BODY_PART_COLUMNS,
    "symptoms": schema.SYMPTOM_COLUMNS,
}
# Ordinal scales: the known values in order; a position on the scale is one number in [0, 1], so a linear
# model can use "longer" / "older" with one weight. Values off the scale (AGE_UNKNOWN, SINCE_CHILDHOOD,
# UNKNOWN) only get their one-hot column.
ORDINAL_SCALES: dict[str, list[str]] = {
    "age_group": schema.ENUM_VALUES["age_group"][:7],
    "condition_duration": schema.ENUM_VALUES["condition_duration"][:7],
    "fitzpatrick_skin_type": schema.FST_VALUES,
}
CATEGORICAL_COLUMNS = ["age_group", "sex_at_birth", "condition_duration", "fitzpatrick_skin_type", "related_category"]
# The raw case columns metadata_features reads: the questionnaire a contributor answers (check boxes, True
# when ticked; single choices, a schema.ENUM_VALUES value). The logged model's input signature declares them.
QUESTIONNAIRE_FLAG_COLUMNS: list[str] = [flag for flags in FLAG_GROUPS.values() for flag in flags]
QUESTIONNAIRE_CHOICE_COLUMNS: list[str] = list(CATEGORICAL_COLUMNS)


def _feature_columns() -> list[str]:
    columns: list[str] = []
    for group, flags in FLAG_GROUPS.items():
        columns += list(flags)
        # "Nothing ticked" is not the same as "every box unticked on purpose": the question was likely skipped.
        columns.append(f"{group}__none_ticked")
        columns.append(f"{group}__n_ticked")
    for column in CATEGORICAL_COLUMNS:
        columns += [f"{column}={value}" for value in schema.ENUM_VALUES[column]]
        # Missing and unrecognised (a value a later release may add) are kept apart: both are information.
        columns += [f"{column}__missing", f"{column}__unrecognised"]
        if column in ORDINAL_SCALES:
            columns += [f"{column}__ordinal", f"{column}__ordinal_missing"]
    return columns


# Every feature ``metadata_features`` returns, in this order:
# - the 4 texture, 12 body-part and 15 symptom check boxes (0/1), then per group "none ticked" (0/1) and the
#   number ticked;
# - for age_group, sex_at_birth, condition_duration, self-reported fitzpatrick_skin_type and
#   related_category: one column per known value (schema.ENUM_VALUES, fixed, never learnt from the data),
#   ``__missing`` (empty answer) and ``__unrecognised`` (a value outside the vocabulary);
# - for the ordinal ones (age, duration, Fitzpatrick): ``__ordinal`` (position on the scale in [0, 1], 0 when
#   off the scale) and ``__ordinal_missing`` (1 when the answer is not on the scale).
METADATA_FEATURE_COLUMNS: list[str] = _feature_columns()


def metadata_features(cases: pd.DataFrame) -> pd.DataFrame:
    """Encode cases as the float32 matrix ``METADATA_FEATURE_COLUMNS`` (index kept from ``cases``).

    Works on any subset of cases: vocabularies are fixed, so the columns never depend on the data. A column
    absent from ``cases`` reads as unticked (flags) or missing (categoricals).
    """
    out: dict[str, np.ndarray] = {}
    n = len(cases)
    for group, flags in FLAG_GROUPS.items():
        ticked = np.zeros((n, len(flags)), dtype=np.float32)
        for j, flag in enumerate(flags):
            if flag in cases:
                ticked[:, j] = cases[flag].fillna(False).astype(bool).to_numpy()
            out[flag] = ticked[:, j]
        out[f"{group}__n_ticked"] = ticked.sum(axis=1)
        out[f"{group}__none_ticked"] = (ticked.sum(axis=1) == 0).astype(np.float32)
    for column in CATEGORICAL_COLUMNS:
        known = schema.ENUM_VALUES[column]
        values = (
            cases[column].astype("object")
            if column in cases
            else pd.Series([None] * n, index=cases.index, dtype="object")
        )
        missing = values.isna().to_numpy()
        as_text = values.where(~values.isna(), "").astype(str).str.strip().to_numpy()
        missing |= as_text == ""
        for value in known:
            out[f"{column}={value}"] = (as_text == value).astype(np.float32)
        out[f"{column}__missing"] = missing.astype(np.float32)
        out[f"{column}__unrecognised"] = (~missing & ~np.isin(as_text, known)).astype(np.float32)
        if column in ORDINAL_SCALES:
            scale = ORDINAL_SCALES[column]
            position = {value: i / (len(scale) - 1) for i, value in enumerate(scale)}
            ordinal = np.array([position.get(v, np.nan) for v in as_text], dtype=np.float32)
            out[f"{column}__ordinal_missing"] = np.isnan(ordinal).astype(np.float32)
            out[f"{column}__ordinal"] = np.nan_to_num(ordinal, nan=0.0)
    frame = pd.DataFrame(out, index=cases.index)
    return frame[METADATA_FEATURE_COLUMNS].astype(np.float32)


# ------------------------------------------------------------------------------------ blank questionnaires
# Modality dropout and blank forms: core.questionnaire says why. What needs the feature encoding is here.

# The questions of the form (serve.inputs builds its fields from the same lists): one per categorical, one
# per check-box group. A group with nothing ticked counts as unanswered (see ``__none_ticked``).
QUESTIONS: tuple[str, ...] = (*CATEGORICAL_COLUMNS, *FLAG_GROUPS)


def blank_questionnaire_features() -> np.ndarray:
    """The float32 ``METADATA_FEATURE_COLUMNS`` vector of a blank form (every box unticked, every answer
    missing), computed by ``metadata_features`` itself so that training's blank is the service's blank."""
    return metadata_features(blank_questionnaires(1)).to_numpy(np.float32)[0]


def with_blank_questionnaires(
    X: np.ndarray, y: np.ndarray, weights: np.ndarray, rate: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Modality dropout for a model fitted once on a weighted table (the scikit-learn metadata model): the
    rows, then a blank-questionnaire copy of each with the same label, weighted ``rate / (1 - rate)`` of its
    original. Blanks then carry ``rate`` of the weight of each example, as random dropout at ``rate`` would in
    expectation, without its sampling noise, and the answered rows keep their weight (so a regularised fit
    weighs them as before). ``rate`` 0: the inputs, unchanged."""
    rate = check_questionnaire_dropout(rate)
    if rate == 0.0:
        return X, y, weights
    matrix = np.asarray(X, dtype=np.float64)
    blank = np.broadcast_to(blank_questionnaire_features().astype(np.float64), matrix.shape)
    return (
        np.vstack([matrix, blank]),
        np.concatenate([np.asarray(y), np.asarray(y)]),
        np.concatenate([weights, weights * (rate / (1.0 - rate))]),
    )


def answered_questions(cases: pd.DataFrame) -> pd.DataFrame:
    """Per case and question (``QUESTIONS``), whether it was answered: a categorical with a value, a check-box
    group with at least one box ticked. Read off ``metadata_features``, so the count agrees with what the
    models see."""
    features = metadata_features(cases)
    answered = {column: features[f"{column}__missing"] == 0 for column in CATEGORICAL_COLUMNS}
    answered.update({group: features[f"{group}__none_ticked"] == 0 for group in FLAG_GROUPS})
    return pd.DataFrame(answered, index=cases.index)[list(QUESTIONS)]


def multilabel_classes(labels: pd.DataFrame) -> list[str]:
    """The condition classes in ``labels``: every name in the ``labels`` lists but ``other``, sorted."""
    return sorted({name for names in labels["labels"] for name in names} - {OTHER})


def multilabel_targets(labels: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """(n cases, K classes) 0/1: 1 where the class is in the case's ``labels`` list."""
    if OTHER in classes:
        raise ValueError(f"{OTHER!r} is not a class: it is the absence of every class")
    index = {name: k for k, name in enumerate(classes)}
    targets = np.zeros((len(labels), len(classes)), dtype=np.int8)
    for i, names in enumerate(labels["labels"]):
        for name in names:
            if name in index:
                targets[i, index[name]] = 1
    return targets


MODEL_KINDS = ("logistic", "hist_gradient_boosting", "logistic_plus_boosting")


@dataclass(frozen=True)
class MetadataModelConfig:
    """One binary model per class (one-vs-rest), each weighting positives and negatives equally.

    kind="logistic": L2 logistic regression, ``C`` the inverse regularisation strength.
    kind="hist_gradient_boosting": HistGradientBoostingClassifier with ``max_depth``, ``learning_rate``,
    ``max_iter`` boosting rounds, ``l2_regularization`` and ``min_samples_leaf``.
    kind="logistic_plus_boosting": both, fitted per class, probabilities averaged (the two err differently:
    the linear model on rare combinations, the trees on small additive effects).
    """

    kind: Literal["logistic", "hist_gradient_boosting", "logistic_plus_boosting"] = "logistic"
    seed: int = 0
    C: float = 1.0
    max_depth: int | None = 3
    learning_rate: float = 0.05
    max_iter: int = 200
    l2_regularization: float = 1.0
    min_samples_leaf: int = 20

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {MODEL_KINDS}, got {self.kind!r}")


@dataclass
class MetadataModel:
    """Per class (in class order) the fitted estimators whose probabilities are averaged, and the config."""

    config: MetadataModelConfig
    estimators: list = field(default_factory=list)


def boosted_trees(config: MetadataModelConfig) -> HistGradientBoostingClassifier:
    """The unfitted boosted-trees half of a model of ``config`` (kind hist_gradient_boosting or
    logistic_plus_boosting), for the multi-label and the single-label model alike."""
    return HistGradientBoostingClassifier(
        max_depth=config.max_depth,
        learning_rate=config.learning_rate,
        max_iter=config.max_iter,
        l2_regularization=config.l2_regularization,
        min_samples_leaf=config.min_samples_leaf,
        early_stopping=False,  # pyright: ignore[reportArgumentType]  # sklearn takes 'auto' or a bool; str is inferred from the default
        random_state=config.seed,
    )


def train_metadata_model(
    X_train, Y_train: np.ndarray, config: MetadataModelConfig = MetadataModelConfig()
) -> MetadataModel:
    """Fit one balanced binary classifier per column of ``Y_train``."""
    X = np.asarray(X_train, dtype=np.float64)
    Y = np.asarray(Y_train)
    if Y.ndim != 2 or len(Y) != len(X):
        raise ValueError(f"Y_train must be (n, K) with n = {len(X)}, got shape {Y.shape}")
    model = MetadataModel(config=config)
    for k in range(Y.shape[1]):
        y = Y[:, k]
        if len(np.unique(y)) < 2:
            raise ValueError(f"class {k} has a single target value in training; it cannot be learnt")
        fitted = []
        if config.kind in ("logistic", "logistic_plus_boosting"):
            fitted.append(LogisticRegression(C=config.C, class_weight="balanced", max_iter=2000).fit(X, y))
        if config.kind in ("hist_gradient_boosting", "logistic_plus_boosting"):
            boosting = boosted_trees(config)
            # HGB's class_weight would do the same; sample weights keep it explicit: each side weighs half.
            fitted.append(boosting.fit(X, y, sample_weight=compute_sample_weight("balanced", y)))
        model.estimators.append(fitted)
    return model


def predict_proba(model: MetadataModel, X) -> np.ndarray:
    """(n, K) probability of each class (each from its own binary model, so rows need not sum to 1)."""
    X = np.asarray(X, dtype=np.float64)
    return np.column_stack(
        [np.mean([estimator.predict_proba(X)[:, 1] for estimator in fitted], axis=0) for fitted in model.estimators]
    )


def multilabel_metrics(Y_true: np.ndarray, P: np.ndarray, classes: list[str] | None = None) -> dict:
    """Mean one-vs-rest ROC AUC and friends.

    ``mean_auc``: macro mean over the classes that have both positives and negatives in ``Y_true`` (AUC is
    undefined otherwise; those classes are listed in ``classes_without_auc``). ``per_class_auc``: class ->
    AUC (NaN when undefined). ``micro_auc``: one AUC over all (case, class) pairs. ``macro_average_precision``:
    mean average precision over the same classes as ``mean_auc``.
    """
    Y_true, P = np.asarray(Y_true), np.asarray(P, dtype=np.float64)
    if Y_true.shape != P.shape:
        raise ValueError(f"Y_true {Y_true.shape} and P {P.shape} differ in shape")
    names = list(classes) if classes is not None else [str(k) for k in range(Y_true.shape[1])]
    per_class_auc, per_class_ap, without = {}, {}, []
    for k, name in enumerate(names):
        y = Y_true[:, k]
        if y.min() == y.max():
            per_class_auc[name] = float("nan")
            without.append(name)
            continue
        per_class_auc[name] = float(roc_auc_score(y, P[:, k]))
        per_class_ap[name] = float(average_precision_score(y, P[:, k]))
    defined = [v for v in per_class_auc.values() if not np.isnan(v)]
    flat = Y_true.ravel()
    return {
        "mean_auc": float(np.mean(defined)) if defined else float("nan"),
        "per_class_auc": per_class_auc,
        "micro_auc": float(roc_auc_score(flat, P.ravel())) if flat.min() != flat.max() else float("nan"),
        "macro_average_precision": float(np.mean(list(per_class_ap.values()))) if per_class_ap else float("nan"),
        "classes_without_auc": without,
    }


# The plain baseline: L2 logistic regression at sklearn's default strength, every feature (the reference).
BASELINE_CONFIG = MetadataModelConfig(kind="logistic", C=1.0)
# The chosen model, every hyper-parameter picked by 5-fold CV on train+val under the chosen task definition
# (see docs/results/metadata_model.md): a strongly regularised logistic regression (C=0.03; 0.01 and 0.03 tie,
# 0.003 and 1 are worse) averaged with boosted stumps (depth 1 beat 2; l2 10). Test was not looked at to choose
# any of it.
CHOSEN_CONFIG = MetadataModelConfig(
    kind="logistic_plus_boosting",
    C=0.03,
    max_depth=1,
    learning_rate=0.05,
    max_iter=150,
    l2_regularization=10.0,
    min_samples_leaf=20,
    seed=0,
)
# The configuration chosen before the task definition was revisited (val only, mention-ranked classes): the
# same model with C=0.01 (not 0.03) and 100 boosting rounds (not 150).
PREVIOUS_CHOSEN_CONFIG = replace(CHOSEN_CONFIG, C=0.01, max_iter=100)

CLASS_RANKINGS = ("top_label", "mention")


@dataclass
class MetadataDataset:
    """Features, targets and split of every labelled case, rows aligned with ``case_ids``."""

    case_ids: np.ndarray
    X: pd.DataFrame
    Y: np.ndarray
    split: np.ndarray
    classes: list[str]


def top_k_classes(cases: pd.DataFrame, top_k: int, rank_by: str = "top_label") -> list[str]:
    """The ``top_k`` most frequent conditions, sorted by name.

    ``rank_by="top_label"``: frequency as a case's highest-weighted condition (the classes the single-label
    image task uses). ``rank_by="mention"``: frequency of being named at all (``assign_labels``' multilabel
    policy). Ties in frequency are broken by name.
    """
    if rank_by not in CLASS_RANKINGS:
        raise ValueError(f"rank_by must be one of {CLASS_RANKINGS}, got {rank_by!r}")
    named = [
        list(names)
        for names in cases["weighted_label_names"]
        if isinstance(names, (list, np.ndarray)) and len(names) > 0
    ]
    counted = [names[0] for names in named] if rank_by == "top_label" else [n for names in named for n in names]
    counts = pd.Series(counted, dtype=object).value_counts()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return sorted(cast(str, name) for name, _ in ranked[:top_k])  # condition names (metadata checks they are str)


def metadata_dataset(
    cases: pd.DataFrame, top_k: int = 10, split_config=None, rank_by: str = "top_label"
) -> MetadataDataset:
    """The top-k task: one 0/1 target per class (1 when the dermatologists named it at all), every labelled
    case a row (all-negative rows included), split case by case.

    Classes come from ``top_k_classes(cases, top_k, rank_by)``. The split is the same for either ranking:
    ``make_splits`` of the default multilabel labels (stratified by their label), so the two task definitions
    are scored on the very same cases.
    """
    from scin_pipeline.core.splits import LabelPolicy, SplitConfig, assign_labels, make_splits

    labels = assign_labels(cases, LabelPolicy(mode="multilabel", top_k=top_k))
    # No duplicate groups: metadata has no images to link cases by, so each case is its own group.
    splits = make_splits(labels, pd.Series(dtype="string"), split_config or SplitConfig())
    classes = top_k_classes(cases, top_k, rank_by)
    by_case = cases.assign(case_id=cases["case_id"].astype(str)).set_index("case_id")
    case_ids = labels["case_id"].astype(str).to_numpy()
    rows = pd.Index(case_ids)  # the same labels as a .loc indexer
    named = pd.DataFrame({"labels": [list(n) for n in by_case.loc[rows, "weighted_label_names"]]})
    X = metadata_features(by_case.loc[rows].reset_index())
    split = splits.assign(case_id=splits["case_id"].astype(str)).set_index("case_id").loc[rows, "split"]
    return MetadataDataset(
        case_ids=case_ids,
        X=X,
        Y=multilabel_targets(named, classes),
        split=split.astype(str).to_numpy(),
        classes=classes,
    )


def evaluate_metadata_model(
    dataset: MetadataDataset, config: MetadataModelConfig, splits: tuple[str, ...] = ("val", "test")
) -> dict[str, dict]:
    """Train on the train split, return ``multilabel_metrics`` on each of ``splits``."""
    return evaluate_predictions(dataset, fit_predict_split(dataset, config, splits))


def fit_predict_split(
    dataset: MetadataDataset, config: MetadataModelConfig, splits: tuple[str, ...] = ("val", "test")
) -> dict[str, np.ndarray]:
    """Train on the train split; the (n rows of that split, K) probabilities on each of ``splits``."""
    train = dataset.split == "train"
    X = dataset.X.to_numpy()
    model = train_metadata_model(X[train], dataset.Y[train], config)
    return {name: predict_proba(model, X[dataset.split == name]) for name in splits}


def evaluate_predictions(dataset: MetadataDataset, predictions: dict[str, np.ndarray]) -> dict[str, dict]:
    """``multilabel_metrics`` of each split's predictions against that split's targets."""
    return {
        name: multilabel_metrics(dataset.Y[dataset.split == name], P, dataset.classes)
        for name, P in predictions.items()
    }


# ------------------------------------------------------------------------------------------ single-label


@dataclass
class SingleLabelMetadataModel:
    """One class per case: the average of a multinomial logistic regression and multiclass boosted trees.

    ``seen_classes`` are the class indices present in training; the others get probability 0. Accepts a
    DataFrame of ``METADATA_FEATURE_COLUMNS`` (reordered by name) or an (N, F) array in that order.
    """

    config: MetadataModelConfig
    num_classes: int
    seen_classes: np.ndarray
    estimators: list = field(default_factory=list)

    def predict_proba(self, X) -> np.ndarray:
        matrix = _feature_matrix(X)
        seen = np.zeros((len(matrix), len(self.seen_classes)))
        if len(self.seen_classes) == 1:
            seen[:, 0] = 1.0  # a single class was seen: it is the only possible answer
        else:
            seen = np.mean([estimator.predict_proba(matrix) for estimator in self.estimators], axis=0)
        out = np.zeros((len(matrix), self.num_classes))
        out[:, self.seen_classes] = seen
        return out / out.sum(axis=1, keepdims=True)


def _feature_matrix(X) -> np.ndarray:
    if isinstance(X, pd.DataFrame):
        missing = [c for c in METADATA_FEATURE_COLUMNS if c not in X.columns]
        if missing:
            raise ValueError(
                f"metadata feature frame lacks {len(missing)} of METADATA_FEATURE_COLUMNS, e.g. {missing[:5]}"
            )
        X = X[METADATA_FEATURE_COLUMNS]
    matrix = np.asarray(X, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(METADATA_FEATURE_COLUMNS):
        raise ValueError(f"metadata features must be (N, {len(METADATA_FEATURE_COLUMNS)}), got {matrix.shape}")
    return matrix


def fit_single_label_metadata_model(
    X,
    y,
    num_classes: int,
    config: MetadataModelConfig | None = None,
    *,
    seed: int | None = None,
    questionnaire_dropout: float = 0.0,
    row_weight: np.ndarray | None = None,
) -> SingleLabelMetadataModel:
    """Fit the single-label (one class per case, ``y`` in [0, num_classes)) metadata classifier.

    ``config`` defaults to ``CHOSEN_CONFIG`` (its kind and hyper-parameters; ``seed`` overrides its seed).
    Every class seen in training weighs the same in total (balanced sample weights), as in the multi-label
    model; ``row_weight`` (one factor per row, e.g. less for a pseudo-label) multiplies those weights.
    ``questionnaire_dropout``: modality dropout, as blank-questionnaire copies of the training rows
    (``with_blank_questionnaires``). Returns an object with ``predict_proba(X) -> (N, num_classes)``, rows
    summing to 1; picklable.
    """
    config = config or CHOSEN_CONFIG
    if seed is not None:
        config = replace(config, seed=seed)
    matrix = _feature_matrix(X)
    labels = np.asarray(y)
    if labels.ndim != 1 or len(labels) != len(matrix):
        raise ValueError(f"y must be a 1-d array of {len(matrix)} class indices, got shape {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no training rows")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"y must hold integer class indices in [0, {num_classes}), got {labels.dtype} "
            f"in [{labels.min()}, {labels.max()}]"
        )
    seen = np.unique(labels)
    model = SingleLabelMetadataModel(config=config, num_classes=num_classes, seen_classes=seen)
    if len(seen) == 1:
        return model
    weights = compute_sample_weight("balanced", labels)
    if row_weight is not None:
        factors = np.asarray(row_weight, dtype=np.float64)
        if factors.shape != labels.shape or (factors <= 0).any():
            raise ValueError(f"row_weight must be {len(labels)} positive factors, got shape {factors.shape}")
        weights = weights * factors
    matrix, labels, weights = with_blank_questionnaires(matrix, labels, weights, questionnaire_dropout)
    if config.kind in ("logistic", "logistic_plus_boosting"):
        model.estimators.append(
            LogisticRegression(C=config.C, max_iter=3000).fit(matrix, labels, sample_weight=weights)
        )
    if config.kind in ("hist_gradient_boosting", "logistic_plus_boosting"):
        model.estimators.append(boosted_trees(config).fit(matrix, labels, sample_weight=weights))
    return model


# ------------------------------------------------------------------------------------------ self-training


@dataclass(frozen=True)
class SelfTrainingConfig:
    """Pseudo-labels for the unlabelled cases, round by round (the semantics of scikit-learn's
    ``SelfTrainingClassifier`` with ``criterion="threshold"``): fit on the labelled rows and the pseudo-labels
    accepted so far, predict the rest of the pool, accept each case whose top class probability is at least
    ``threshold`` (its label is that class, and stays), until a round accepts none or ``max_rounds`` have run;
    then one final fit. ``max_rounds=0`` is the supervised model itself.

    ``pseudo_label_weight``: a pseudo-labelled row weighs this much of a dermatologist-labelled row of the
    same class (after class balancing over labelled and pseudo-labelled rows together).
    """

    threshold: float = 0.5
    max_rounds: int = 3
    pseudo_label_weight: float = 0.5

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be within (0, 1], got {self.threshold}")
        if self.max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0, got {self.max_rounds}")
        if not 0 < self.pseudo_label_weight <= 1:
            raise ValueError(f"pseudo_label_weight must be within (0, 1], got {self.pseudo_label_weight}")


SELF_TRAINING_HISTORY_COLUMNS = ["round", "accepted", "pseudo_labelled", "still_unlabelled", "mean_confidence"]


@dataclass
class SelfTrainedMetadataModel:
    """The final model (a ``SingleLabelMetadataModel`` fitted on labelled + pseudo-labelled rows), each
    unlabelled row's pseudo-label (-1: never confident enough) and the round it was accepted in (-1),
    and one history row per round (``SELF_TRAINING_HISTORY_COLUMNS``)."""

    model: SingleLabelMetadataModel
    pseudo_labels: np.ndarray
    accepted_round: np.ndarray
    history: pd.DataFrame


def fit_self_trained_metadata_model(
    X,
    y,
    X_unlabelled,
    num_classes: int,
    self_training: SelfTrainingConfig = SelfTrainingConfig(),
    config: MetadataModelConfig | None = None,
    *,
    seed: int | None = None,
    questionnaire_dropout: float = 0.0,
) -> SelfTrainedMetadataModel:
    """Self-training of the single-label metadata model (see :class:`SelfTrainingConfig`).

    Why not ``sklearn.semi_supervised.SelfTrainingClassifier`` itself: the model is two estimators averaged
    (``fit_single_label_metadata_model``) with class-balanced sample weights, and a pseudo-label must weigh
    less than a dermatologist's label; SelfTrainingClassifier fits one estimator, gives every pseudo-label
    full weight, and routes sample weights only with scikit-learn's process-wide metadata-routing switch.
    The loop is short and keeps its semantics (threshold criterion, labels kept once assigned, a final fit).
    ``config``, ``seed`` and ``questionnaire_dropout`` go to every fit, as to the supervised twin's.
    """
    labelled = _feature_matrix(X)
    pool = _feature_matrix(X_unlabelled) if len(X_unlabelled) else np.zeros((0, labelled.shape[1]))
    labels = np.asarray(y)
    pseudo = np.full(len(pool), -1, dtype=np.int64)
    accepted_round = np.full(len(pool), -1, dtype=np.int64)
    history = []

    def fit() -> SingleLabelMetadataModel:
        taken = pseudo >= 0
        rows = np.vstack([labelled, pool[taken]])
        targets = np.concatenate([labels, pseudo[taken]]).astype(labels.dtype)
        factors = np.concatenate([np.ones(len(labels)), np.full(int(taken.sum()), self_training.pseudo_label_weight)])
        return fit_single_label_metadata_model(
            rows,
            targets,
            num_classes,
            config,
            seed=seed,
            row_weight=factors,
            questionnaire_dropout=questionnaire_dropout,
        )

    model = fit()
    for round_number in range(1, self_training.max_rounds + 1):
        open_rows = np.flatnonzero(pseudo < 0)
        if len(open_rows) == 0:
            break
        proba = model.predict_proba(pool[open_rows])
        confidence = proba.max(axis=1)
        confident = confidence >= self_training.threshold
        pseudo[open_rows[confident]] = proba[confident].argmax(axis=1)
        accepted_round[open_rows[confident]] = round_number
        history.append(
            (
                round_number,
                int(confident.sum()),
                int((pseudo >= 0).sum()),
                int((pseudo < 0).sum()),
                float(confidence[confident].mean()) if confident.any() else float("nan"),
            )
        )
        if not confident.any():
            break
        model = fit()
    return SelfTrainedMetadataModel(
        model=model,
        pseudo_labels=pseudo,
        accepted_round=accepted_round,
        history=pd.DataFrame(history, columns=SELF_TRAINING_HISTORY_COLUMNS),
    )

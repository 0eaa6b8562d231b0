"""Thin Dagster assets, one module per stage; the rules they apply live in scin_pipeline.core."""

import warnings

from dagster import BetaWarning, load_asset_checks_from_modules, load_assets_from_modules

# backfill_policy and Output(data_version=...) are beta in Dagster 1.13; we use both on purpose.
warnings.filterwarnings("ignore", category=BetaWarning)

from scin_pipeline.assets import curation, evaluation, fairness, ingest, report, training  # noqa: E402 (after the filter)

_MODULES = [ingest, report, curation, training, evaluation, fairness]
ALL_ASSETS = load_assets_from_modules(_MODULES)
ALL_ASSET_CHECKS = load_asset_checks_from_modules(_MODULES)

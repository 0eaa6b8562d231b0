"""Thin Dagster assets, one module per stage; the rules they apply live in scin_pipeline.core."""

import warnings

from dagster import BetaWarning, load_asset_checks_from_modules, load_assets_from_modules

# Importing the asset modules runs their decorators. One of them uses a beta API on purpose:
# `@asset(backfill_policy=BackfillPolicy.single_run())` on curation.image_quality (one run covers every
# shard), which warns "Parameter `backfill_policy` of function `asset` is currently in beta" once, at
# decoration. That one warning is silenced here, for this import only: catch_warnings restores the
# caller's filters afterwards, so nothing is filtered globally. Every import of an asset module passes
# through this package first, so this is the one place it can be raised.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy` of function `asset`", category=BetaWarning)
    from scin_pipeline.assets import curation, evaluation, fairness, ingest, patterns, report, training, unlabelled

_MODULES = [ingest, report, curation, unlabelled, training, evaluation, fairness, patterns]
ALL_ASSETS = load_assets_from_modules(_MODULES)
ALL_ASSET_CHECKS = load_asset_checks_from_modules(_MODULES)

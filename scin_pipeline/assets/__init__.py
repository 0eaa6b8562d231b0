"""Thin Dagster assets, one module per stage; the rules they apply live in scin_pipeline.core."""

from dagster import load_asset_checks_from_modules, load_assets_from_modules

from scin_pipeline.assets import ingest, report

_MODULES = [ingest, report]
ALL_ASSETS = load_assets_from_modules(_MODULES)
ALL_ASSET_CHECKS = load_asset_checks_from_modules(_MODULES)

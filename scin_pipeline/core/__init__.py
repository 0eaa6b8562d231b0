"""Pure rules of the pipeline: no Dagster imports here, every function is unit-tested directly."""

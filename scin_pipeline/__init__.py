"""scin-pipeline: a Dagster pipeline for fair skin-condition classification on Google's SCIN dataset."""

__version__ = "0.1.0"

"""Data files shipped inside the package (no code): see ``scin_pipeline.data.scin``."""

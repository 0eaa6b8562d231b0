"""The real SCIN 1.0.0 metadata (four CSVs, the SCIN Data Use License and a README), shipped as package data.

Read them through ``scin_pipeline.core.bundled_metadata`` (the one owner: location, SHA-256 check). No SCIN
image is included. See ATTRIBUTION.md beside this file: licence, citation, and the ban on re-identifying
contributors.
"""

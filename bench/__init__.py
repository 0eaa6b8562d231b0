"""Benchmarks and calibrations, run as scripts (``python bench/<name>.py``); importable as a package so
that tests can reach the helpers a benchmark and its test share (``bench.quality_calibration``)."""

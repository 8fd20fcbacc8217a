"""Benchmarks: ``anyserve bench offline`` (offline.py) and ``anyserve bench serving`` (serving.py,
a load generator against a running server, with its prompt sets in datasets.py)."""

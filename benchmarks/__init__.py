"""Benchmarks: run by hand (``python -m benchmarks.run``), never inside the test suite."""

"""Benchmarks, run as `python -m benchmarks.NAME` from the checkout root with .venv."""

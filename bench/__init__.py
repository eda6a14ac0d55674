"""Benchmarks that boot real guests; run each as ``python -m bench.<name>``."""

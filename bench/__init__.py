"""Benchmarks: `make bench` runs each module here and prints its figures."""

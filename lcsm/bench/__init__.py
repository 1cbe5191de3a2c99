"""Benchmarks: one module per `lcsm bench NAME`, on one shared scaffold (lcsm/bench/common.py)."""

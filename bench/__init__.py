"""Throughput benchmark of both backends (`make bench`, `python -m bench.run`)."""

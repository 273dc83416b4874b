"""The top floor: benchmarks and tools that use both backends (`make bench`, `make doctor`, the memory grid, the backend choice of `make train`, the shard-check timing)."""

"""What checking every shard costs at start-up: python -m bench.shard_check [--tokens N] [--shards K].

Writes K shards of N random ids below 1024 (default: one shard of 100M tokens, 200 MB, the size of
a FineWeb sp1024 export shard) in a temporary folder, then times data.shards.check_shard on each:
once from the page cache, and once after asking the kernel to drop it (root on Linux only; else
that row is skipped and says so).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from data.shards import check_shard, write_shard


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--shards", type=int, default=1, help="number of shards")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(args.shards):
            path = Path(folder) / f"bench_train_{i:06d}.bin"
            write_shard(path, rng.integers(0, 1024, args.tokens, dtype=np.uint16))
            paths.append(path)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        for label, cold in (("page cache", False), ("cold (caches dropped)", True)):
            if cold and not drop_page_cache():
                print(f"{label}: not measured (dropping the page cache needs root on Linux)")
                continue
            start = time.perf_counter()
            for path in paths:
                check_shard(path, 1024)
            seconds = time.perf_counter() - start
            print(f"{label}: {args.shards} shard(s), {size_mb:,.0f} MB: {seconds:.2f} s, "
                  f"{seconds / args.shards:.2f} s per shard, {size_mb / seconds:,.0f} MB/s")


if __name__ == "__main__":
    main()

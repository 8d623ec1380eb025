"""Neighbours at catalogue scale: a 500,000 x 64 table (issue 3 figures).

Not collected by pytest. From the repository root:

    python tests/benchmarks/bench_neighbors.py                       # 500k x 64, k=20
    python tests/benchmarks/bench_neighbors.py --rows 50000 --skip-all

Writes a synthetic clustered table through the real export code, loads it back, then reports:
single-query latency of `NeighborIndex.neighbors` after load (median and p95 of 200 queries) and
of the table's SavedModel signatures (`lookup`, `neighbors`; 100 queries each),
the time and peak RSS of `write_all_neighbors` (every row's top-k by blocked matrix products),
and the time of k-means clusters. Peak RSS is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time

import numpy as np

from schemas.tables import TableSpec
from trainer import neighbors
from trainer.export import write_table
from trainer.tables import load_table


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--skip-all", action="store_true", help="skip the all-rows neighbour export")
    parser.add_argument("--dir", default=tempfile.mkdtemp(prefix="embedpipe-bench-nn-"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    vectors = centres[rng.integers(args.clusters, size=args.rows)] + 0.5 * rng.normal(
        size=(args.rows, args.dim)
    ).astype(np.float32)
    keys = [f"m{i:07d}" for i in range(args.rows - 1)] + ["<OOV 0>"]
    frequency = rng.zipf(1.3, size=args.rows).astype(np.int64)
    spec = TableSpec("item", "vocabulary", ("item",), args.rows, args.dim, args.rows - 1, 1)
    started = time.perf_counter()
    path = write_table(os.path.join(args.dir, "item"), spec, keys, vectors, frequency, {"bench": True})
    print(f"export of a {args.rows} x {args.dim} table: {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    table = load_table(path)
    index = neighbors.NeighborIndex(table)
    print(f"load_table + NeighborIndex: {time.perf_counter() - started:.1f}s, peak RSS {peak_rss_mib():.0f} MiB")
    latencies = []
    for key in rng.choice(keys[:-1], size=200):
        t0 = time.perf_counter()
        index.neighbors(key, 10)
        latencies.append((time.perf_counter() - t0) * 1000)
    print(
        f"single query (top 10 of {args.rows}): median {np.median(latencies):.1f} ms, p95 {np.percentile(latencies, 95):.1f} ms"
    )
    import tensorflow as tf

    started = time.perf_counter()
    served = tf.saved_model.load(os.path.join(path, "saved_model"))
    print(f"SavedModel load: {time.perf_counter() - started:.1f}s")
    latencies = {"lookup": [], "neighbors": []}
    for key in rng.choice(keys[:-1], size=100):
        for name, kwargs in (("lookup", {}), ("neighbors", {"k": tf.constant(10)})):
            t0 = time.perf_counter()
            served.signatures[name](keys=tf.constant([key]), **kwargs)
            latencies[name].append((time.perf_counter() - t0) * 1000)
    for name, values in latencies.items():
        print(
            f"SavedModel `{name}` signature, one key: median {np.median(values):.1f} ms, p95 {np.percentile(values, 95):.1f} ms"
        )
    if not args.skip_all:
        rss_before = peak_rss_mib()
        result = neighbors.write_all_neighbors(table, args.k, os.path.join(args.dir, "neighbors.parquet"))
        print(
            f"all-rows top-{result['k']} neighbours: {result['seconds']}s "
            f"({args.rows / max(result['seconds'], 1e-9):.0f} rows/s), peak RSS {peak_rss_mib():.0f} MiB "
            f"(before: {rss_before:.0f} MiB; block budget {neighbors.BLOCK_BYTES / 2**20:.0f} MiB)"
        )
    started = time.perf_counter()
    assignment, _ = neighbors.kmeans(index.unit, args.clusters)
    print(f"k-means, {args.clusters} clusters: {time.perf_counter() - started:.1f}s, peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()

"""Exact vs. approximate (HNSW) neighbours of every row of a large table.

Not collected by pytest. Needs the `ann` extra (`pip install -e ".[ann]"`). From the repository root:

    python tests/benchmarks/bench_ann.py --rows 500000 --dim 64 [--exact-sample 20000]
    OPENBLAS_CORETYPE=Haswell python tests/benchmarks/bench_ann.py ...   # faiss' bundled BLAS

Writes a table of `--rows` clustered vectors (`--clusters` Gaussian clusters, seeded) with
`trainer.export.write_table`, then times:

* the exact search of `neighbors --all` (blocks of matmul + top_k against every row) for the
  first `--exact-sample` rows, extrapolated linearly to every row (its cost is rows x rows x dim);
* building the HNSW index (`trainer.ann.HnswIndex.load_or_build`, cosine, default parameters) and
  its own recall@20 on 1,000 rows;
* single queries (1,000 rows, one `search` call each): p50 and p99 latency;
* `neighbors --all --approximate` over every row, and the recall@20 of its output against the
  exact top-20 of 2,000 sampled rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq

from schemas.tables import TableSpec
from trainer import ann, neighbors
from trainer.export import write_table
from trainer.tables import load_table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--exact-sample", type=int, default=20_000)
    parser.add_argument("--output", default="/tmp/bench/ann")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    vectors = centres[rng.integers(args.clusters, size=args.rows)] + 0.5 * rng.normal(size=(args.rows, args.dim))
    keys = [f"k{i}" for i in range(args.rows)] + ["<OOV 0>"]
    vectors = np.concatenate([vectors, np.zeros((1, args.dim))]).astype(np.float32)
    spec = TableSpec("item", "vocabulary", ("item",), len(keys), args.dim, args.rows, 1)
    path = os.path.join(args.output, "item")
    for name in ("hnsw-cosine.faiss", "hnsw-cosine.faiss.json"):
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    write_table(path, spec, keys, vectors, np.ones(len(keys), np.int64), {})
    table = load_table(path)
    result = {"rows": args.rows, "dim": args.dim, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE")}

    # the exact cost is rows x rows: time the sample's rows against every row
    started = time.perf_counter()
    exact_rows = args.exact_sample
    unit = neighbors.NeighborIndex(table).unit
    truth = ann.exact_top_k(unit[:exact_rows], unit, 21)
    exact_s = time.perf_counter() - started
    result["exact_sample_s"] = round(exact_s, 1)
    result["exact_all_s_extrapolated"] = round(exact_s * args.rows / exact_rows, 1)

    started = time.perf_counter()
    index = ann.HnswIndex.load_or_build(table, "cosine")
    result["index"] = index.info
    result["build_and_recall_s"] = round(time.perf_counter() - started, 1)
    unit = neighbors.NeighborIndex(table).unit
    latency = []
    for row in np.random.default_rng(1).choice(args.rows, 1000, replace=False):
        started = time.perf_counter()
        index.search(unit[row : row + 1], 20)
        latency.append(time.perf_counter() - started)
    result["single_query_ms"] = {"p50": round(1e3 * float(np.percentile(latency, 50)), 3),
                                 "p99": round(1e3 * float(np.percentile(latency, 99)), 3)}  # fmt: skip
    started = time.perf_counter()
    out = neighbors.write_all_neighbors(table, 20, os.path.join(args.output, "neighbors.parquet"), index=index)
    result["approximate_all_s"] = round(time.perf_counter() - started, 1)
    found = pq.read_table(out["path"]).slice(0, 2000).column("neighbors").to_pylist()
    key_row = {k: i for i, k in enumerate(table.keys)}
    recall = []
    for row, names in enumerate(found):
        exact = [r for r in truth[row] if r != row][:20]
        recall.append(len({key_row[n] for n in names} & set(exact)) / 20)
    result["approximate_all_recall@20"] = round(float(np.mean(recall)), 4)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

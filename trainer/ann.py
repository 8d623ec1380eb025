"""Approximate nearest neighbours for large tables: an HNSW index (faiss, the `ann` extra) written
beside an exported table, with its parameters and its measured recall.

    pip install -e ".[ann]"
    embedpipe neighbors EXPORT/item --all -k 20 --approximate
    embedpipe recommend EXPORT --all -k 20 --approximate

Exact search stays the default; `--approximate` loads the table's index, or builds it and writes
it beside the table when there is none or the table's vectors changed. Two indexes per table,
one per metric:

* `hnsw-cosine.faiss`: the unit rows, inner product = cosine (`neighbors --all`);
* `hnsw-dot.faiss`: the rows as they are, inner product (`recommend --all`: user . item).

Each has a `.json` beside it: metric, rows, dim, HNSW parameters (`m`, `ef_construction`,
`ef_search`), the sha256 of the table's vectors it was built from, build seconds, and its
`recall@k`: the share of the exact top-k (`RECALL_K`) it finds for `RECALL_SAMPLE` table rows
used as queries (seeded). OOV rows are not in the index.

faiss-cpu's bundled OpenBLAS may pick a slow kernel on some CPUs; set `OPENBLAS_CORETYPE`
(e.g. `Haswell`) when the build is unexpectedly slow (docs/performance.md has the figures).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from trainer.tables import EmbeddingTable

_LOG = logging.getLogger(__name__)
METRICS = ("cosine", "dot")
RECALL_K = 20
RECALL_SAMPLE = 1000
BLOCK_BYTES = 256 * 2**20
MISSING = '--approximate needs faiss (the `ann` extra): pip install -e ".[ann]"'


def available() -> bool:
    """Whether faiss (the optional `ann` extra) is installed."""
    return importlib.util.find_spec("faiss") is not None


def _faiss():
    # faiss is an optional extra: imported when an index is used, so the rest of the module loads without it
    import faiss

    return faiss


@dataclass(frozen=True)
class HnswParams:
    """HNSW's knobs: graph degree `m`, build beam `ef_construction`, search beam `ef_search`."""

    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128


class HnswIndex:
    """An HNSW index over a table's vocabulary rows (`load_or_build` makes one).

    Args:
        index: the faiss index.
        info: its `.json` (module docstring).
    """

    def __init__(self, index, info: dict):
        self.index, self.info = index, info
        self.index.hnsw.efSearch = int(info["ef_search"])

    @classmethod
    def load_or_build(cls, table: EmbeddingTable, metric: str, params: HnswParams = HnswParams()) -> HnswIndex:
        """The table's `metric` index: read from beside the table when it matches the table's
        vectors and `params`, else built (and written there, with its measured recall)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        path = os.path.join(table.path, f"hnsw-{metric}.faiss")
        sha = table.manifest["files"]["vectors"]["sha256"]
        wanted = {"metric": metric, "vectors_sha256": sha, "m": params.m, "ef_construction": params.ef_construction}
        if tf.io.gfile.exists(path + ".json"):
            with tf.io.gfile.GFile(path + ".json") as f:
                info = json.load(f)
            if all(info.get(k) == v for k, v in wanted.items()):
                with tf.io.gfile.GFile(path, "rb") as f:
                    index = _faiss().deserialize_index(np.frombuffer(f.read(), np.uint8))
                _LOG.info("ann: %s (recall@%d %.3f)", path, info["k"], info[f"recall@{info['k']}"])
                return cls(index, {**info, "ef_search": params.ef_search})
        vectors = _rows(table, metric)
        started = time.time()
        _LOG.info("ann: building the %s HNSW index of %s (%d x %d) ...", metric, table.name, *vectors.shape)
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(vectors.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.add(vectors)
        built = time.time() - started
        info = {**wanted, "rows": int(vectors.shape[0]), "dim": int(vectors.shape[1]), "ef_search": params.ef_search}
        info["build_s"] = round(built, 1)
        made = cls(index, info)
        info["k"], info[f"recall@{RECALL_K}"] = RECALL_K, round(made.recall(vectors, RECALL_K), 4)
        # each file to a temporary name, then renamed: a reader sees a whole index or the old one;
        # the .json last, so it only ever describes an index that is in place
        for target, content in (
            (path, faiss.serialize_index(index).tobytes()),
            (path + ".json", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()),
        ):
            temp = f"{target}.tmp-{uuid.uuid4().hex}"
            with tf.io.gfile.GFile(temp, "wb") as f:
                f.write(content)
            tf.io.gfile.rename(temp, target, overwrite=True)
        _LOG.info("ann: %s in %.0fs, recall@%d %.3f", path, built, RECALL_K, info[f"recall@{RECALL_K}"])
        return made

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [n, k], rows int64 [n, k]) of the k best rows of each query (-1: none)."""
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)

    def recall(self, vectors: np.ndarray, k: int, sample: int = RECALL_SAMPLE, seed: int = 0) -> float:
        """The share of the exact top-k that `search` finds, for `sample` rows of `vectors` as queries."""
        rng = np.random.default_rng(seed)
        queries = vectors[rng.choice(len(vectors), min(sample, len(vectors)), replace=False)]
        _, found = self.search(queries, k)
        exact = exact_top_k(queries, vectors, k)
        return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """int64 [n, k]: the rows of the k largest inner products of each query, in blocks."""
    block = max(1, BLOCK_BYTES // (4 * len(vectors)))
    matrix = tf.constant(vectors)
    out = []
    for start in range(0, len(queries), block):
        scores = tf.matmul(tf.constant(queries[start : start + block]), matrix, transpose_b=True)
        out.append(tf.math.top_k(scores, min(k, len(vectors))).indices.numpy())
    return np.concatenate(out).astype(np.int64)


def _rows(table: EmbeddingTable, metric: str) -> np.ndarray:
    vectors = np.ascontiguousarray(table.vectors[: table.real_rows], np.float32)
    if metric == "cosine":
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors

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
import logging
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from schemas import layout
from trainer.tables import EmbeddingTable, unit_rows

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
            info = layout.read_json(path + ".json")
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
        temp = f"{path}.tmp-{uuid.uuid4().hex}"
        with tf.io.gfile.GFile(temp, "wb") as f:
            f.write(faiss.serialize_index(index).tobytes())
        tf.io.gfile.rename(temp, path, overwrite=True)
        layout.write_json_atomically(path + ".json", info)
        _LOG.info("ann: %s in %.0fs, recall@%d %.3f", path, built, RECALL_K, info[f"recall@{RECALL_K}"])
        return made

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [n, k], rows int64 [n, k]) of the k best rows of each query (-1: none)."""
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)

    def search_excluding(
        self, queries: np.ndarray, excluded: tf.RaggedTensor, k: int, extra: int, exact
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best rows of each query with its `excluded` rows left out.

        Asks the index for k + `extra` candidates and drops the excluded ones; a query left with
        fewer than k gets `exact(positions)` instead.

        Args:
            queries: float32 [n, dim].
            excluded: int64 ragged [n, (m)], rows to leave out of each query's answer.
            k: rows per query.
            extra: candidates asked for beyond k (how many exclusions are expected).
            exact: positions of queries (int64 [s]) -> (rows [s, k], scores [s, k]) exactly.

        Returns:
            (rows int64 [n, k], scores float32 [n, k]), best first.
        """
        scores, top = self.search(queries, k + extra)
        # one int64 key per (query, row): a candidate is dropped when its key is excluded
        width = np.int64(self.info["rows"] + 1)
        excluded_keys = excluded.value_rowids().numpy() * width + excluded.flat_values.numpy()
        drop = np.isin(np.arange(len(top), dtype=np.int64)[:, None] * width + top, excluded_keys) | (top < 0)
        order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept candidates first, in score order
        rows, best = np.take_along_axis(top, order, 1), np.take_along_axis(scores, order, 1)
        short = np.flatnonzero((~drop).sum(axis=1) < k)
        if len(short):
            rows[short], best[short] = exact(short)
        return rows, best

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
    vectors = table.vectors[: table.real_rows]
    return np.ascontiguousarray(unit_rows(vectors) if metric == "cosine" else vectors, np.float32)

"""Nearest neighbours and clusters over exported tables (`embedpipe neighbors` and `clusters` are
their command lines, in `embedpipe.commands`; recommendations are `trainer.recommender`'s).

    embedpipe neighbors EXPORT/item "Toy Story (1995)" -k 10     # by key or by label (title)
    embedpipe neighbors EXPORT/item --all -k 20                   # EXPORT/item/neighbors.parquet
    embedpipe clusters EXPORT/item -k 50                          # EXPORT/item/clusters.parquet

Similarity is cosine; OOV rows are never returned. `--all` and `clusters` work in blocks of
rows whose similarity matrix stays under `BLOCK_BYTES`, so memory stays bounded for 500,000
rows and more (time is what grows: all-pairs is rows^2 x dim multiply-adds).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from schemas.progress import Progress
from trainer.tables import EmbeddingTable, UnknownKeyError, unit_rows

_LOG = logging.getLogger(__name__)
BLOCK_BYTES = 256 * 2**20


class NeighborIndex:
    """Cosine top-k over one table; queries by key, by label, or by vector."""

    def __init__(self, table: EmbeddingTable):
        self.table = table
        self.unit = unit_rows(table.vectors[: table.real_rows])
        self._by_label = None  # {label: first row}, built on the first lookup by label

    def row(self, key_or_label: str) -> int:
        """The row of a key, else of the first row with that label; `UnknownKeyError` if neither."""
        if key_or_label in self.table and self.table.row(key_or_label) < len(self.unit):
            return self.table.row(key_or_label)
        if key_or_label in self._label_rows():
            return self._by_label[key_or_label]
        raise UnknownKeyError(f"table {self.table.name!r} has no key or label {key_or_label!r}")

    def _label_rows(self) -> dict[str, int]:
        """{label: its first real row}, built on the first lookup by label."""
        if self._by_label is None:
            self._by_label = {}
            for row, label in enumerate((self.table.labels or [])[: self.table.real_rows]):
                self._by_label.setdefault(label, row)
        return self._by_label

    def top_k(self, scores: np.ndarray, k: int, exclude: int | None = None) -> list[tuple[str, str, float]]:
        """(key, label, score) of the k best of `scores` (float [real rows]), best first, `exclude` left out."""
        if exclude is not None:
            scores = scores.copy()
            scores[exclude] = -np.inf
        k = min(k, len(scores) - (exclude is not None))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self.table.keys[i], self.table.label(i), float(scores[i])) for i in top]

    def nearest_keys(self, rows: list[int], k: int, block: int = 128) -> list[list[str]]:
        """The keys of the k nearest rows of each of `rows` (unordered), each itself excluded;
        `block` rows at a time."""
        out = []
        for start in range(0, len(rows), block):
            part = np.asarray(rows[start : start + block])
            scores = self.unit[part] @ self.unit.T
            scores[np.arange(len(part)), part] = -np.inf
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            out.extend([[self.table.keys[i] for i in row] for row in top])
        return out

    def neighbors(self, key_or_label: str, k: int = 10) -> list[tuple[str, str, float]]:
        """(key, label, cosine) of the k nearest rows, the query itself excluded."""
        return self.neighbors_of_row(self.row(key_or_label), k)

    def neighbors_of_row(self, row: int, k: int = 10) -> list[tuple[str, str, float]]:
        """`neighbors` of the key of a real row (no lookup by key)."""
        return self.top_k(self.unit @ self.unit[row], k, exclude=row)


def showcase(
    table: EmbeddingTable, count: int = 2, k: int = 5, pool: int = 20, unlike: float = 0.5
) -> list[tuple[str, str, list]]:
    """The neighbours of a few telling keys of a table, for a run's summary.

    The first key is the table's most frequent; each next one is, of the `pool` most frequent
    keys, the most frequent whose cosine to every key already picked is below `unlike` (else
    the least similar one), so that a day x hour table shows a morning and an evening, say.

    Args:
        table: an exported table.
        count: how many keys.
        k: neighbours per key.
        pool: the most frequent keys to pick from.
        unlike: the cosine below which a key counts as unlike the ones picked.

    Returns:
        [(key, its label or "", [(neighbour key, label, cosine), ...]), ...], at most `count`
        keys (none for a table of fewer than two real rows).
    """
    index = NeighborIndex(table)
    real = table.real_rows
    if real < 2:
        return []
    frequency = np.asarray(table.frequencies[:real], dtype=np.float64)
    candidates = np.argsort(-frequency, kind="stable")[:pool]
    picked = [int(candidates[0])]
    while len(picked) < min(count, len(candidates)):
        closest = (index.unit[candidates] @ index.unit[picked].T).max(axis=1)
        closest[np.isin(candidates, picked)] = np.inf
        below = np.flatnonzero(closest < unlike)  # in frequency order
        picked.append(int(candidates[below[0] if len(below) else np.argmin(closest)]))
    return [(table.keys[row], table.label(row), index.neighbors_of_row(row, min(k, real - 1))) for row in picked]


def write_all_neighbors(table: EmbeddingTable, k: int, path: str, index=None) -> dict:
    """Top-k neighbours of every row -> Parquet (key, neighbors list<string>, scores list<float32>).

    Args:
        table: the table.
        k: neighbours per row.
        path: the Parquet file.
        index: an approximate index of the table's unit rows (`trainer.ann.HnswIndex`, metric
            cosine), or None for the exact search.

    Returns:
        {"path", "rows", "k", "seconds", "approximate"}.
    """
    neighbours = NeighborIndex(table)
    n = len(neighbours.unit)
    k = min(k, n - 1)
    block = max(1, min(n, BLOCK_BYTES // (4 * n)))
    if index is not None:
        block = 4096
    keys = np.array(table.keys[:n], dtype=object)
    schema = pa.schema([("key", pa.string()), ("neighbors", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))])
    started = time.time()
    unit = tf.constant(neighbours.unit)
    progress = Progress(_LOG, "neighbors --all", total=n, unit="rows")
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, block):
            rows = np.arange(start, min(start + block, n))
            if index is not None:  # itself excluded: one candidate more
                itself = tf.RaggedTensor.from_row_lengths(rows.astype(np.int64), np.ones(len(rows), np.int64))
                top, scores = index.search_excluding(
                    neighbours.unit[rows],
                    itself,
                    k,
                    1,
                    lambda short, rows=rows: _exact(neighbours.unit, rows[short], k),
                )
            else:
                # TensorFlow's matmul + top_k: ~5x faster than numpy's argpartition over each row.
                sims = tf.matmul(unit[start : start + len(rows)], unit, transpose_b=True)
                diagonal = tf.stack([tf.range(len(rows)), tf.constant(rows, tf.int32)], axis=1)
                sims = tf.tensor_scatter_nd_update(sims, diagonal, tf.fill([len(rows)], -np.inf))  # not itself
                scores, top = (x.numpy() for x in tf.math.top_k(sims, k))
            writer.write_table(
                pa.table(
                    {
                        "key": pa.array(keys[rows].tolist(), pa.string()),
                        "neighbors": pa.array([keys[t].tolist() for t in top], pa.list_(pa.string())),
                        "scores": pa.array(list(scores.astype(np.float32)), pa.list_(pa.float32())),
                    },
                    schema=schema,
                )
            )
            progress.add(len(rows))
    progress.done()
    return {
        "path": path,
        "rows": n,
        "k": k,
        "seconds": round(time.time() - started, 1),
        "approximate": index is not None,
    }


def _exact(unit: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) [len(rows), k] of each row's k exact neighbours, itself left out, a
    memory-bounded block at a time (the fallback of an approximate search)."""
    top, scores = np.zeros((len(rows), k), np.int64), np.zeros((len(rows), k), np.float32)
    step = max(1, BLOCK_BYTES // (4 * len(unit)))
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        sims = unit[rows[part]] @ unit.T
        sims[np.arange(len(sims)), rows[part]] = -np.inf
        best = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, best, 1), axis=1, kind="stable")
        top[part] = np.take_along_axis(best, order, 1)
        scores[part] = np.take_along_axis(sims, top[part], 1)
    return top, scores


def kmeans(unit: np.ndarray, k: int, iterations: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (cosine) with k-means++ seeding; returns (assignment, unit centroids)."""
    rng = np.random.default_rng(seed)
    n = len(unit)
    k = min(k, n)
    centroids = [unit[rng.integers(n)]]
    closest = 1.0 - unit @ centroids[0]
    for _ in range(1, k):
        weights = np.maximum(closest, 0) ** 2
        pick = rng.choice(n, p=weights / weights.sum()) if weights.sum() > 0 else rng.integers(n)
        centroids.append(unit[pick])
        closest = np.minimum(closest, 1.0 - unit @ unit[pick])
    centroids = np.stack(centroids)
    assignment = np.full(n, -1)
    for _ in range(iterations):
        new = _assign(unit, centroids)
        if np.array_equal(new, assignment):
            break
        assignment = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, assignment, unit)
        empty = np.linalg.norm(sums, axis=1) == 0
        sums[empty] = centroids[empty]  # an empty cluster keeps its centroid
        centroids = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    return assignment, centroids


def _assign(unit: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    block = max(1, BLOCK_BYTES // (4 * len(centroids)))
    return np.concatenate([np.argmax(unit[s : s + block] @ centroids.T, axis=1) for s in range(0, len(unit), block)])


def write_clusters(table: EmbeddingTable, k: int, path: str, seed: int = 0) -> dict:
    """k-means clusters of a table -> Parquet (key, label, cluster, similarity to its centroid)."""
    index = NeighborIndex(table)
    assignment, centroids = kmeans(index.unit, k, seed=seed)
    similarity = np.einsum("ij,ij->i", index.unit, centroids[assignment]).astype(np.float32)
    n = len(index.unit)
    labels = (table.labels or [""] * len(table.keys))[:n]
    pq.write_table(
        pa.table(
            {
                "key": pa.array(table.keys[:n], pa.string()),
                "label": pa.array(labels, pa.string()),
                "cluster": pa.array(assignment.astype(np.int32)),
                "similarity": pa.array(similarity),
            }
        ),
        path,
    )
    return {"path": path, "rows": n, "clusters": int(len(centroids)), "sizes": np.bincount(assignment).tolist()}

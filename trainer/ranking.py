"""Top-k over every item, in blocks of users, and the ranking metrics (Recall@K, NDCG@K) of it.

`TopK` scores a block of queries against the whole item matrix, sets each user's seen items to
-inf and returns the best k items, without a Python loop per user. It is exact: the items are
split into chunks, the chunks with the k best maxima are the only ones that can hold the top k,
and those are searched in full (about twice as fast as one top-k over every item). `RankingMetrics`
accumulates Recall@K and NDCG@K of those rankings over blocks.

Memory is bounded by one block's score matrix (`SCORE_BYTES`), whatever the number of users.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

SCORE_BYTES = 128 << 20  # one block's [users, items] float32 scores
CHUNK = 1024  # items per chunk of the exact chunked top-k
# The score of a seen item, and lower still, of a padding column: a user who has seen nearly
# everything gets seen items last, never a row that does not exist.
SEEN = -1e30
PADDING = -3e38


def block_users(items: int, limit: int = 1024) -> int:
    """Users per block so that a block's scores stay under `SCORE_BYTES`."""
    return int(max(1, min(limit, SCORE_BYTES // (4 * max(items, 1)))))


class TopK:
    """The best items for query vectors, among every row of `items`, seen items excluded.

    Args:
        items: float32 [items, dim], the candidates (OOV rows left out: never recommended).
    """

    def __init__(self, items: np.ndarray):
        items = np.asarray(items, np.float32)
        self.rows = int(items.shape[0])
        self.chunks = -(-self.rows // CHUNK)
        # [dim + 1, chunks * CHUNK]: the padding columns score PADDING through the extra
        # dimension, which queries hold as a 1 (no copy of the score matrix to pad it)
        padded = np.zeros((items.shape[1] + 1, self.chunks * CHUNK), np.float32)
        padded[:-1, : self.rows] = items.T
        padded[-1, self.rows :] = PADDING
        self.items_t = tf.constant(padded)

    def __call__(self, query: tf.Tensor, seen: tf.RaggedTensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items of each query.

        Args:
            query: float32 [b, dim].
            seen: int64 ragged [b, (n)], items to leave out (rows >= `items` are ignored).
            k: how many (at most `items`).

        Returns:
            (rows int64 [b, k], scores float32 [b, k]), best first; seen items score `SEEN`.
        """
        k = min(int(k), self.rows)
        query = tf.convert_to_tensor(query, tf.float32)
        rows, scores = _chunked_top_k(
            query, self.items_t, seen.value_rowids(), seen.flat_values, tf.constant(k), self.rows, self.chunks
        )
        return rows.numpy(), scores.numpy()


@tf.function(reduce_retracing=True)
def _chunked_top_k(query, items_t, seen_users, seen_items, k, rows: int, chunks: int):
    """`TopK.__call__`'s work, one trace for every table of the same size (a function of the
    module, not of one TopK, so that each evaluation does not trace it again)."""
    b = tf.shape(query)[0]
    scores = tf.matmul(tf.concat([query, tf.ones([b, 1])], axis=1), items_t)  # [b, chunks * CHUNK]
    inside = seen_items < rows
    index = tf.stack([seen_users[inside], seen_items[inside]], axis=1)
    scores = tf.tensor_scatter_nd_update(scores, index, tf.fill([tf.shape(index)[0]], SEEN))
    chunked = tf.reshape(scores, [b, chunks, CHUNK])
    best = tf.math.top_k(tf.reduce_max(chunked, axis=2), tf.minimum(k, chunks)).indices  # [b, c]
    candidates = tf.reshape(tf.gather(chunked, best, batch_dims=1), [b, -1])
    ids = tf.reshape(tf.cast(best, tf.int64)[:, :, None] * CHUNK + tf.range(CHUNK, dtype=tf.int64), [b, -1])
    top = tf.math.top_k(candidates, k)
    return tf.gather(ids, top.indices, batch_dims=1), top.values


class PopularityTopK:
    """`TopK` for one score per item shared by every user (popularity): the best unseen items are
    among the `k` + (most seen items of a user in the block) best overall, so only those are
    looked at.

    Args:
        scores: float [items], e.g. training occurrences.
    """

    def __init__(self, scores: np.ndarray):
        scores = np.asarray(scores, np.float64)
        self.rows = len(scores)
        order = np.argsort(-scores, kind="stable")
        self.order = tf.constant(order, tf.int64)
        self.scores = tf.constant(scores[order], tf.float32)
        rank = np.empty(self.rows, np.int64)
        rank[order] = np.arange(self.rows)
        self.rank = tf.constant(rank)

    def __call__(self, query, seen: tf.RaggedTensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As `TopK.__call__`; `query` only gives the block's size."""
        k = min(int(k), self.rows)
        b = int(query.shape[0])
        width = min(self.rows, k + int(tf.reduce_max(seen.row_lengths())) if b else k)
        inside = seen.flat_values < self.rows
        user, item = seen.value_rowids()[inside], seen.flat_values[inside]
        position = tf.gather(self.rank, item)
        keep = position < width
        index = tf.stack([user[keep], position[keep]], axis=1)
        scores = tf.tensor_scatter_nd_update(
            tf.tile(self.scores[None, :width], [b, 1]), index, tf.fill([tf.shape(index)[0]], SEEN)
        )
        top = tf.math.top_k(scores, k)
        return tf.gather(self.order, top.indices).numpy(), top.values.numpy()


class RankingMetrics:
    """Recall@K and NDCG@K over blocks of users, each user's held-out items against their ranking.

    Recall@K is the share of a user's (distinct) held-out items among their top K; NDCG@K the
    discounted gain of those hits over the best possible. A held-out item outside the ranked
    items (an OOV row) counts as a miss. Both are means over users.
    """

    def __init__(self, ks):
        self.ks = tuple(ks)
        self.users = 0
        self.recall = {k: 0.0 for k in self.ks}
        self.ndcg = {k: 0.0 for k in self.ks}
        self.discounts = 1.0 / np.log2(np.arange(2, max(self.ks) + 2))

    def add(self, top: np.ndarray, targets: tf.RaggedTensor) -> None:
        """Adds a block: `top` int64 [b, K] (best first), `targets` int64 ragged [b, (t)]."""
        wanted = targets.to_tensor(default_value=-1).numpy()  # [b, t]
        ordered = np.sort(wanted, axis=1)
        distinct = (
            (ordered != -1) & np.concatenate([np.ones((len(ordered), 1), bool), ordered[:, 1:] != ordered[:, :-1]], 1)
        ).sum(1)
        hits = (top[:, :, None] == wanted[:, None, :]).any(axis=2) if wanted.shape[1] else np.zeros(top.shape, bool)
        ideal = np.concatenate([[0.0], np.cumsum(self.discounts)])
        for k in self.ks:
            h = hits[:, :k]
            self.recall[k] += float((h.sum(1) / np.maximum(distinct, 1)).sum())
            dcg = (h * self.discounts[: h.shape[1]]).sum(1)
            self.ndcg[k] += float((dcg / ideal[np.minimum(distinct, h.shape[1])].clip(min=1e-12)).sum())
        self.users += len(top)

    def result(self) -> dict[str, float]:
        """{"recall@K": ..., "ndcg@K": ...}: means over the users added."""
        n = max(self.users, 1)
        return {
            **{f"recall@{k}": self.recall[k] / n for k in self.ks},
            **{f"ndcg@{k}": self.ndcg[k] / n for k in self.ks},
        }

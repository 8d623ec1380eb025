"""Collaborative training: item (and user) embeddings learned from watch histories, chosen on a
validation slice and evaluated on the temporal holdout.

Models (`training.models` of a collaborative config):

* `two_tower`: a user table and an item table; score(user, item) = u . v (matrix factorisation
  trained as retrieval);
* `bag_of_history`: a user is a weighted mean of the embeddings of the items in their history
  (the sparse "watched" vector embedded directly); score = mean_w(v_history) . v_item, one item
  table. The weights depend only on an item's position from the end of the history (newest
  first) and are learned: they start equal (a plain mean) and learn how much recent items
  matter more (on MovieLens they fall ~15x over the last 10 items; on histories without
  temporal structure they stay flat). They are in the manifest as `history_weights`;
* `self_attention` (opt-in): the newest item of a history attends over the last `max_history`
  items (item content plus a learned position embedding and bias); one attention step and a
  small feed-forward layer, starting as a plain mean (`SelfAttention`).

Every model has `query(user, history)` (what it is trained and evaluated with) and
`history_query(history)` (a vector for a history alone: the export's user vectors and the
recommender's SavedModel, `trainer.recommender`).

All train with an in-batch softmax over the batch's target items, corrected for candidate
popularity (logQ: the log of each item's share of training interactions is subtracted from its
logit) and with accidental hits (the same item twice in a batch) masked, and the user's own
other targets where a batch holds several of them on purpose: with `training.user_chunk` > 1,
bag_of_history reads its pairs in chunks of that many consecutive targets of one user
(`BagOfHistory.sequence_queries`: each item row of a chunk is read once; faster, but on
MovieLens it scored lower, so it is opt-in). Tables are
`trainer.sparse.SparseEmbedding`s updated by `SparseAwareOptimizer` (lazy Adam: only the rows
in the batch and their moments are touched), so a step costs the same for 5,000 or 500,000 items.

The data streams (`trainer.sequences`): pairs are cut from the per-user records as they are
read, through bounded shuffle buffers, so memory is bounded by the tables, the optimizer's slots
and the buffers, not by the number of interactions.

Model choice never looks at the test holdout: after every epoch each model is scored on the
validation slice (the last `evaluation.validation_holdout` training interactions of up to
`evaluation.validation_users` users, never trained on); a model stops after `training.patience`
epochs without a better validation metric and keeps its best epoch's tables, and the model with
the best validation metric is the one exported. Then every model, and a popularity ranking, is
scored on the test holdout: *all* items of the vocabulary (not the OOV rows) ranked for every
user with a holdout (or a sample of `evaluation.users`), the user's training items excluded,
Recall@K and NDCG@K (`trainer.ranking`); and each item table's "more like this" hit rate (the
next item among the nearest neighbours of the user's newest one).

Writes each model's `tables.npz` (its tables and every weight, float32, no pickle: `save_model`,
`load_model`; `schemas.layout.retrieval_tables_path`) and the `train` section of the manifest;
`trainer.export` turns the chosen model into exported tables and the recommender.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from schemas import layout
from schemas.config import CollaborativeConfig
from schemas.manifest import read_manifest, update_manifest
from schemas.progress import Progress
from schemas.tables import TableSpec, table_keys, table_specs
from trainer import sequences
from trainer.model import set_rows
from trainer.ranking import PopularityTopK, RankingMetrics, TopK, block_users
from trainer.sparse import SparseAwareOptimizer, SparseEmbedding
from trainer.tables import load_source, match_rows, unit_rows

_LOG = logging.getLogger(__name__)
STEPS_PER_CALL = 50  # training steps per call into TensorFlow (progress is logged between calls)
MORE_LIKE_THIS_USERS = 20_000  # users the "more like this" hit rate is measured on (the first read)


class TwoTower(keras.Model):
    """Matrix factorisation trained as retrieval: a user table and an item table, score u . v.

    Args:
        users, items: table rows (vocabulary plus OOV rows).
        user_dim, item_dim: the tables' dimension; they must be equal.
    """

    def __init__(self, users: int, items: int, user_dim: int, item_dim: int):
        super().__init__()
        if user_dim != item_dim:
            raise ValueError(f"two_tower needs one dimension for both tables, got user {user_dim}, item {item_dim}")
        self.user_table = SparseEmbedding(
            users, user_dim, embeddings_initializer=_init(user_dim), name="user_embedding"
        )
        self.item_table = SparseEmbedding(
            items, item_dim, embeddings_initializer=_init(item_dim), name="item_embedding"
        )

    def query(self, user, history):
        """The users' vectors.

        Args:
            user: int64 [batch], rows of the user table.
            history: unused (the history is in the user's own vector).

        Returns:
            float32 [batch, dim].
        """
        return self.user_table(user)

    def history_query(self, history: tf.Tensor) -> tf.Tensor:
        """A vector for a history alone (a user the user table does not have): the plain mean of
        its item vectors, the cold-start query of a two-tower model.

        Args:
            history: int64 [batch, H], right-aligned item rows, -1 where there is none.

        Returns:
            float32 [batch, dim]; zeros for an empty history.
        """
        return _pool(self.item_table, history, tf.zeros([tf.shape(history)[1]]))

    def tables(self) -> dict[str, np.ndarray]:
        """The learned matrices: {"user": [users, dim], "item": [items, dim]}, float32."""
        return {"user": _weights(self.user_table), "item": _weights(self.item_table)}


class BagOfHistory(keras.Model):
    """A user is the recency-weighted mean of the item vectors of their history; one item table.

    Args:
        items: item table rows (vocabulary plus OOV rows).
        item_dim: the item dimension.
        max_history: how many of the newest history items are pooled (one learned weight each).
    """

    def __init__(self, items: int, item_dim: int, max_history: int):
        super().__init__()
        self.item_table = SparseEmbedding(
            items, item_dim, embeddings_initializer=_init(item_dim), name="item_embedding"
        )
        # log-weight of the item at each position from the end of the history (0 = newest)
        self.recency = self.add_weight(shape=(max_history,), initializer="zeros", name="recency_logits")

    def query(self, user, history: tf.Tensor):
        """The recency-weighted mean of each history's item vectors.

        Args:
            user: unused.
            history: int64 [batch, H] (H <= max_history), rows of the item table, right-aligned
                (the last column is the newest item), -1 where there is none.

        Returns:
            float32 [batch, dim]; zeros for an empty history.
        """
        history = tf.convert_to_tensor(history)
        return _pool(self.item_table, history, self.recency[: tf.shape(history)[1]])

    def history_query(self, history: tf.Tensor) -> tf.Tensor:
        """The query of a history (`query` without a user): the same vector."""
        return self.query(None, history)

    def sequence_queries(self, sequence: tf.Tensor, chunk: int) -> tuple[tf.Tensor, tf.Tensor]:
        """The queries and target vectors of chunks of consecutive targets (training, with
        `training.user_chunk`): each item row of a chunk is read once, and every target's query
        pools the H items before it (`query` of its window, the same vector).

        Args:
            sequence: int64 [C, H + chunk]: H history items, then the chunk's targets; -1 where
                there is none (the weights see only real items, and no padding row is read).
            chunk: targets per chunk.

        Returns:
            (queries, targets), float32 [C * chunk, dim] each; target c * chunk + i is the item
            at column H + i of chunk c, its query pools columns i .. H + i - 1 (zeros for none).
        """
        sequence = tf.convert_to_tensor(sequence)
        width = sequence.shape[1]
        history = width - chunk
        dim = self.item_table.output_dim
        valid = sequence >= 0
        where = tf.where(valid)
        shape = tf.concat([tf.shape(sequence, out_type=tf.int64), [dim]], 0)
        x = tf.scatter_nd(where, self.item_table(tf.gather_nd(sequence, where)), shape)  # [C, W, d]
        # band[i, j]: weight of column j in target i's query; position from the end H + i - 1 - j
        position = history - 1 + tf.range(chunk)[:, None] - tf.range(width)[None, :]
        inside = (position >= 0) & (position < history)
        band = tf.where(inside, tf.exp(tf.gather(self.recency, tf.clip_by_value(position, 0, history - 1))), 0.0)
        weights = band[None] * tf.cast(valid, tf.float32)[:, None, :]  # [C, chunk, W]
        pooled = tf.einsum("ckw,cwd->ckd", weights, x) / tf.maximum(tf.reduce_sum(weights, -1), 1e-9)[..., None]
        return tf.reshape(pooled, [-1, dim]), tf.reshape(x[:, history:], [-1, dim])

    def history_weights(self) -> list[float]:
        """Relative weight of each position from the end (newest first), the newest scaled to 1."""
        w = np.exp(self.recency.numpy().astype(np.float64))
        return [round(float(x), 4) for x in w / w[0]]

    def tables(self) -> dict[str, np.ndarray]:
        """The learned matrix: {"item": [items, dim]}, float32."""
        return {"item": _weights(self.item_table)}


class SelfAttention(keras.Model):
    """Sequence-aware: the newest item of a history attends over the last `max_history` items.

    query = a + W2 relu(W1 a), a = sum_j softmax_j(q . k_j / sqrt(d) + r_j) v_j, with
    q = Wq x_newest, k_j = Wk (x_j + p_j), v_j = Wv x_j, x the item vectors, p_j and r_j a
    learned embedding and a learned bias of the position j from the end (newest first).
    It starts as a plain mean (Wq = 0, Wv = I, W2 = 0, r = 0) — the bag of history — and learns
    how much which earlier items matter given the newest one (order and content), one attention
    step per pair (the only output used is the newest position's, so no causal mask is needed).

    Args:
        items: item table rows (vocabulary plus OOV rows).
        item_dim: the item dimension d.
        max_history: H, positions with their own embedding and bias.
    """

    def __init__(self, items: int, item_dim: int, max_history: int):
        super().__init__()
        d = item_dim
        self.item_table = SparseEmbedding(items, d, embeddings_initializer=_init(d), name="item_embedding")
        self.position = self.add_weight(shape=(max_history, d), initializer="zeros", name="position_embedding")
        self.recency = self.add_weight(shape=(max_history,), initializer="zeros", name="recency_logits")
        self.wq = self.add_weight(shape=(d, d), initializer="zeros", name="query_kernel")
        self.wk = self.add_weight(shape=(d, d), initializer="identity", name="key_kernel")
        self.wv = self.add_weight(shape=(d, d), initializer="identity", name="value_kernel")
        self.w1 = self.add_weight(shape=(d, 2 * d), initializer="glorot_uniform", name="ffn_kernel_1")
        self.w2 = self.add_weight(shape=(2 * d, d), initializer="zeros", name="ffn_kernel_2")

    def query(self, user, history: tf.Tensor):
        """The attention read-out of each history at its newest item.

        Args:
            user: unused.
            history: int64 [batch, H] (H <= max_history), right-aligned item rows (the last
                column is the newest), -1 where there is none.

        Returns:
            float32 [batch, dim]; zeros for an empty history.
        """
        history = tf.convert_to_tensor(history)
        width = tf.shape(history)[1]
        valid = history >= 0
        where = tf.where(valid)
        # only real items are looked up: no padding row is touched (sparse updates stay sparse)
        shape = tf.concat([tf.shape(history, out_type=tf.int64), [self.position.shape[1]]], 0)
        x = tf.scatter_nd(where, self.item_table(tf.gather_nd(history, where)), shape)
        by_column = tf.reverse(self.position[:width], [0])  # column j is position width-1-j from the end
        bias = tf.reverse(self.recency[:width], [0])
        q = x[:, -1, :] @ self.wq  # [B, d]; the newest column (zeros for an empty history)
        k = tf.einsum("bwd,de->bwe", x + by_column[None], self.wk)
        v = tf.einsum("bwd,de->bwe", x, self.wv)
        logits = tf.einsum("bd,bwd->bw", q, k) * tf.math.rsqrt(tf.cast(tf.shape(q)[1], tf.float32)) + bias[None]
        logits = tf.where(valid, logits, -1e9)
        attention = tf.nn.softmax(logits) * tf.cast(valid, tf.float32)  # an empty row: all zeros
        a = tf.einsum("bw,bwd->bd", attention, v)
        return a + tf.nn.relu(a @ self.w1) @ self.w2

    def history_query(self, history: tf.Tensor) -> tf.Tensor:
        """The query of a history (`query` without a user): the same vector."""
        return self.query(None, history)

    def tables(self) -> dict[str, np.ndarray]:
        """The learned matrix: {"item": [items, dim]}, float32."""
        return {"item": _weights(self.item_table)}


def _pool(table, history: tf.Tensor, log_weights: tf.Tensor) -> tf.Tensor:
    """The weighted mean of each history's item vectors, weight exp(log_weights[p]) at position
    p from the end (0 = newest).

    Args:
        table: the item `SparseEmbedding`.
        history: int64 [batch, H], right-aligned, -1 where there is none.
        log_weights: float32 [H].

    Returns:
        float32 [batch, dim]; zeros for an empty history.
    """
    batch = tf.shape(history)[0]
    where = tf.where(history >= 0)  # [n, 2]: (pair, column) of each real item
    segments = where[:, 0]
    # column j is position H-1-j from the end; a dense gradient, so Adam (not the sparse path)
    weights = tf.gather(tf.exp(tf.reverse(log_weights, [0])), where[:, 1])
    vectors = table(tf.gather_nd(history, where))  # only real items: no padding row is touched
    pooled = tf.math.unsorted_segment_sum(vectors * weights[:, None], segments, batch)
    total = tf.math.unsorted_segment_sum(weights, segments, batch)
    return pooled / tf.maximum(total, 1e-9)[:, None]  # an empty history gives a zero query


def _init(dim: int) -> keras.initializers.Initializer:
    # Unit-scale dot products from the start: with Keras' default +-0.05 the logits are ~0 and
    # the first epochs barely move.
    return keras.initializers.RandomNormal(stddev=dim**-0.5)


def _weights(layer) -> np.ndarray:
    return np.asarray(layer.embeddings.numpy(), dtype=np.float32)


def build(name: str, users: TableSpec, items: TableSpec, max_history: int) -> keras.Model:
    """The model `name` of `training.models` for tables of these sizes, its weights created."""
    if name == "two_tower":
        model = TwoTower(users.rows, items.rows, users.dim, items.dim)
    elif name == "self_attention":
        model = SelfAttention(items.rows, items.dim, max_history)
    else:
        model = BagOfHistory(items.rows, items.dim, max_history)
    model.query(tf.zeros([1], tf.int64), tf.fill([1, 1], tf.constant(-1, tf.int64)))  # creates every weight
    model.item_table(tf.zeros([1], tf.int64))
    return model


def save_model(model: keras.Model, path: str) -> None:
    """Writes a model's tables and every weight to one `.npz` (float32 matrices, no pickle):
    `item` (and `user`) for the export, `weight_<i>` in `get_weights()` order for `load_model`."""
    tf.io.gfile.makedirs(os.path.dirname(path))
    buffer = io.BytesIO()
    np.savez(buffer, **model.tables(), **{f"weight_{i}": w for i, w in enumerate(model.get_weights())})
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())


def load_model(path: str, name: str, users: TableSpec, items: TableSpec, max_history: int) -> keras.Model:
    """The model `save_model` wrote to `path` (`build`'s arguments as when it was trained).

    Raises:
        FileNotFoundError: `path` holds only tables (written before models saved every weight).
    """
    with tf.io.gfile.GFile(path, "rb") as f:  # read member by member: the tables are not read twice
        with np.load(f, allow_pickle=False) as npz:
            weights = [npz[f"weight_{i}"] for i in range(sum(k.startswith("weight_") for k in npz.files))]
    if not weights:
        raise FileNotFoundError(
            f"{path} has the tables but not the weights of {name} (trained by an older embedpipe); "
            "run `embedpipe train` on this run again, then `embedpipe export`"
        )
    model = build(name, users, items, max_history)
    model.set_weights(weights)
    return model


def in_batch_softmax_loss(query, candidates, targets, log_q, weights, valid=None, users=None):
    """Softmax over the batch's targets, logQ-corrected, accidental hits masked; weighted mean.

    Example i's positive is candidate i; the other examples' targets are its negatives, except
    those that are the same item (accidental hits) or, given `users`, another target of the same
    user (an item the user did watch is no negative for them): masked. Each candidate's logit is lowered by
    the log of its share of training interactions (logQ), which undoes the popularity bias of
    sampling negatives in proportion to it.

    Args:
        query: float32 [batch, dim], the users' query vectors.
        candidates: float32 [batch, dim], the target items' vectors.
        targets: int64 [batch], the target items' rows.
        log_q: float32 [items], log of each item's share of training interactions.
        weights: float32 [batch], each example's weight (0 drops it).
        valid: bool [batch], False for padding examples, which are no one's negative either.
        users: int64 [batch], each example's user row.

    Returns:
        The weighted mean cross-entropy, a float32 scalar.
    """
    n = tf.shape(targets)[0]
    valid = tf.ones([n], tf.bool) if valid is None else valid
    users = tf.range(n, dtype=targets.dtype) if users is None else users  # distinct: no one masked
    return _softmax_cross_entropy(query, candidates, targets, tf.gather(log_q, targets), weights, valid, users)


def _softmax_cross_entropy(query, candidates, targets, log_q, weights, valid, users):
    """`in_batch_softmax_loss` with its gradient computed with the loss: the [batch, batch]
    element-wise work is one XLA function, which also gives the logits' gradient G, so the
    backward pass is just G @ candidates and G^T @ query (~2x faster than autodiff's).

    G enters through a term that is exactly zero, sum(G * scores) minus itself unchanged, whose
    gradient is the matmul's with upstream G; not `tf.custom_gradient`, which in a traced
    function registers every trace's gradient in a global registry for good, and with it the
    graph and the tables it captured (a fitted model's memory was never freed)."""
    scores = tf.matmul(query, candidates, transpose_b=True)
    loss, g = _masked_softmax(tf.stop_gradient(scores), targets, log_q, weights, valid, users)
    linear = tf.reduce_sum(tf.stop_gradient(g) * scores)
    return tf.stop_gradient(loss) + (linear - tf.stop_gradient(linear))


@tf.function(jit_compile=True)
def _masked_softmax(scores, targets, log_q, weights, valid, users):
    """(loss, dloss/dscores) of the in-batch softmax over `scores` [batch, batch] (query i x
    candidate j), logQ-corrected (`log_q` [batch], the candidates'), masked, weighted mean."""
    n = tf.shape(targets)[0]
    diagonal = tf.eye(n, dtype=tf.bool)
    same = tf.equal(targets[:, None], targets[None, :]) | tf.equal(users[:, None], users[None, :])
    masked = (same & ~diagonal) | ~valid[None, :]
    logits = tf.where(masked, tf.constant(-1e9, scores.dtype), scores - log_q[None, :])
    top = tf.reduce_max(logits, axis=1, keepdims=True)
    exp = tf.exp(logits - top)
    total = tf.reduce_sum(exp, axis=1, keepdims=True)
    losses = tf.math.log(total[:, 0]) + top[:, 0] - tf.linalg.diag_part(logits)
    weight = weights / tf.maximum(tf.reduce_sum(weights), 1e-9)
    g = tf.where(masked, 0.0, exp / total - tf.cast(diagonal, scores.dtype)) * weight[:, None]  # masked: constant
    return tf.reduce_sum(losses * weight), g


class Data:
    """Where a run's collaborative data is, and what the trainer needs to know of it.

    Args:
        config: the run's collaborative config.
        output_dir: the run directory (preprocessed).
        specs: the tables, by name.
    """

    def __init__(self, config: CollaborativeConfig, output_dir: str, specs: dict[str, TableSpec]):
        self.config = config
        self.train = layout.examples_pattern(output_dir, layout.TRAIN)
        self.eval = layout.examples_pattern(output_dir, layout.EVAL)
        self.users, self.items = specs[config.user.name], specs[config.item.name]
        self.weighted = config.weight is not None
        rows = read_manifest(output_dir).get("preprocess", {})
        self.train_pairs = int(rows.get("rows", {}).get("train", 0))
        self.eval_users = int(rows.get("users_evaluated", 0))
        counts = layout.read_id_counts(output_dir).get(config.item.name, {})
        self.item_counts = np.zeros(self.items.rows, np.float64)
        if counts:
            ids = np.fromiter(counts.keys(), np.int64, len(counts))
            self.item_counts[ids] = np.fromiter(counts.values(), np.float64, len(counts))
        self.log_q = tf.constant(
            np.log(np.maximum(self.item_counts, 1.0) / max(self.item_counts.sum(), 1.0)), tf.float32
        )
        ev = config.evaluation
        users = max(self.users.vocabulary_size or self.users.rows, 1)
        holdout = config.holdout if ev.validation_holdout is None else ev.validation_holdout
        self.validation = sequences.Validation(min(1.0, ev.validation_users / users), holdout)
        self.eval_share = 1.0 if ev.users is None or self.eval_users <= ev.users else ev.users / self.eval_users
        self._validation_blocks = None

    def pairs(self, epoch: int, validation: bool = True, with_history: bool = True, chunk: int = 1) -> tf.data.Dataset:
        """One epoch of shuffled training pairs (`trainer.sequences.training_pairs`), the
        validation slice left out (`validation`) or not, with history windows or without
        (`with_history`, for a model that reads none), or in chunks of `chunk` targets."""
        t = self.config.training
        return sequences.training_pairs(
            self.train,
            history=self.config.max_history,
            batch_size=t.batch_size,
            pool_pairs=t.shuffle_buffer,
            mean_pairs=self.train_pairs / max(self.users.vocabulary_size or 1, 1),
            seed=t.seed,
            epoch=epoch,
            weighted=self.weighted,
            validation=self.validation if validation else sequences.Validation(0.0, self.validation.holdout),
            with_history=with_history,
            chunk=chunk,
        )

    def validation_blocks(self) -> list[dict]:
        """The validation slice's blocks, read once and kept (a few thousand users' histories)."""
        if self._validation_blocks is None:
            self._validation_blocks = list(
                sequences.validation_blocks(
                    self.train,
                    history=self.config.max_history,
                    block_users=block_users(self.items.vocabulary_size),
                    validation=self.validation,
                )
            )
        return self._validation_blocks

    def eval_blocks(self) -> tf.data.Dataset:
        return sequences.eval_blocks(
            self.eval,
            history=self.config.max_history,
            block_users=block_users(self.items.vocabulary_size),
            share=self.eval_share,
        )


def training_optimizer(learning_rate: float) -> SparseAwareOptimizer:
    """What `fit` trains with: the tables row-wise through lazy Adam, the few dense weights
    (history recency, attention) through Adam, both at `learning_rate`."""
    return SparseAwareOptimizer(
        learning_rate=learning_rate, algorithm="lazy_adam", dense_optimizer=keras.optimizers.Adam(learning_rate)
    )


def batch_loss(model: keras.Model, batch: dict, log_q: tf.Tensor, chunk: int = 1) -> tf.Tensor:
    """The in-batch softmax loss of one training batch (`Data.pairs`), as `fit` trains it.

    Args:
        model: a model of `build`.
        batch: a pair batch, or with `chunk` > 1 a chunk batch (`trainer.sequences`).
        log_q: float32 [items], each item's log share of training interactions.
        chunk: targets per chunk (`training.user_chunk`; a model with `sequence_queries`).

    Returns:
        The scalar loss; a pair without a history weighs nothing for a model that reads one.
    """
    needs_history = not isinstance(model, TwoTower)
    weight = batch["weight"] * (tf.cast(batch["has_history"], tf.float32) if needs_history else 1.0)
    if chunk > 1:
        query, candidates = model.sequence_queries(batch["sequence"], chunk)
        users = batch["user"]  # a chunk's targets are one user's: none is a negative for the others
    else:
        query, candidates = model.query(batch["user"], batch["history"]), model.item_table(batch["target"])
        users = None
    return in_batch_softmax_loss(query, candidates, batch["target"], log_q, weight, batch["valid"], users)


def fit(model: keras.Model, name: str, data: Data, *, epochs: int, validate: bool = True) -> dict:
    """Trains `model` with the in-batch softmax, epoch by epoch, early-stopped on validation.

    After every epoch the model is scored on the validation slice; it stops after `patience`
    epochs without a better headline metric (an equal one counts as better: on a plateau the
    later epoch is kept) and ends with its best epoch's weights.

    Args:
        model: a `TwoTower` or `BagOfHistory`.
        name: the model's name, for the logs.
        data: the run's data.
        epochs: at most this many epochs.
        validate: leave the validation slice out and stop early on it; False trains on every
            pair for exactly `epochs` epochs (the refit).

    Returns:
        {"losses": mean loss per epoch, "validation": validation metrics per epoch,
        "best_epoch": 1-based, "examples_per_s": training pairs per second of the epochs}.
    """
    t, headline = data.config.training, data.config.evaluation.headline
    needs_history = not isinstance(model, TwoTower)
    chunk = t.user_chunk if hasattr(model, "sequence_queries") else 1
    optimizer = training_optimizer(t.learning_rate)

    def step(batch):
        with tf.GradientTape() as tape:
            loss = batch_loss(model, batch, data.log_q, chunk)
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss, tf.math.count_nonzero(batch["valid"])

    @tf.function
    def steps(iterator):
        """Up to STEPS_PER_CALL steps in one call (no Python between them): (loss sum, steps, pairs)."""
        total, count, pairs = tf.constant(0.0), tf.constant(0), tf.constant(0, tf.int64)
        for _ in tf.range(STEPS_PER_CALL):
            batch = iterator.get_next_as_optional()
            if not batch.has_value():
                break
            loss, n = step(batch.get_value())
            total, count, pairs = total + loss, count + 1, pairs + n
        return total, count, pairs

    first = tf.function(step)  # builds the optimizer's slots outside the loop of `steps`
    losses, curve, best, best_epoch, seconds, examples = [], [], None, 0, 0.0, 0
    validate = validate and data.validation.share > 0
    what = f"train {name}" if validate or data.validation.share <= 0 else f"refit {name} on every pair"
    for epoch in range(epochs):
        progress = Progress(_LOG, f"{what}: epoch {epoch + 1}/{epochs}", total=data.train_pairs, unit="examples")
        iterator = iter(data.pairs(epoch, validation=validate, with_history=needs_history, chunk=chunk))
        total, count = 0.0, 0
        if not optimizer.built:
            loss, n = first(next(iterator))
            total, count = float(loss), 1
            progress.add(int(n))
        while True:
            loss, n, pairs = (x.numpy() for x in steps(iterator))
            if not n:
                break
            total, count = total + float(loss), count + int(n)
            progress.add(int(pairs))
        losses.append(total / count if count else float("nan"))
        seconds += progress.done()
        examples += progress.count
        if not validate:
            _LOG.info("%s: epoch %d/%d loss %.4f", what, epoch + 1, epochs, losses[-1])
            continue
        metrics = evaluate({name: model}, data.validation_blocks(), data, what=f"validation {name}")[0][name]
        curve.append(metrics)
        _LOG.info("train %s: epoch %d/%d loss %.4f, validation %s", name, epoch + 1, epochs, losses[-1], _fmt(metrics))
        if best is None or metrics[headline] >= curve[best_epoch][headline]:
            best, best_epoch = model.get_weights(), epoch
        elif epoch - best_epoch >= t.patience:
            _LOG.info(
                "train %s: no better validation %s for %d epochs; back to epoch %d",
                name,
                headline,
                t.patience,
                best_epoch + 1,
            )
            break
    if best is not None:
        model.set_weights(best)
    return {
        "losses": losses,
        "validation": curve,
        "best_epoch": best_epoch + 1 if validate else len(losses),
        "examples_per_s": round(examples / max(seconds, 1e-9), 1),
    }


def evaluate(
    models: dict,
    blocks,
    data: Data,
    *,
    what: str,
    popularity: bool = False,
    more_like_this: bool = False,
) -> tuple[dict, int] | tuple[dict, int, dict]:
    """Recall@K and NDCG@K of each model's ranking of every vocabulary item, seen items excluded.

    One model at a time (a pass over `blocks` each, popularity with the first): only one
    ranker's copy of an item table is alive at once, which matters at 500,000 items (each
    `TopK` holds a transposed copy of the table).

    Args:
        models: {name: model with `query` and `item_table`}.
        blocks: blocks of users (`Data.validation_blocks`, `Data.eval_blocks`), iterable more
            than once.
        data: the run's data (the item vocabulary, the popularity counts).
        what: for the progress lines.
        popularity: also rank by training popularity (as "popularity").
        more_like_this: also score item-to-item use of each item table: the hit rate@K of a
            user's first held-out item among the K nearest items (cosine) of their newest
            training item, the item itself excluded; users without a training item are skipped;
            on the first `MORE_LIKE_THIS_USERS` users read (the manifest says how many).

    Returns:
        ({name: {"recall@K": ..., "ndcg@K": ...}}, plus "popularity" when asked; users scored),
        and with `more_like_this` a third item: {name: {"hit_rate@K": ...}, "users": n}.
    """
    vocab, ks = data.items.vocabulary_size, data.config.evaluation.k
    results, users, extra = {}, 0, {}
    for i, (name, model) in enumerate(models.items()):
        rankers = {name: (TopK(_weights(model.item_table)[:vocab]), model.query)}
        if popularity and i == 0:  # with the first model: its ranker is small
            rankers["popularity"] = (PopularityTopK(data.item_counts[:vocab]), _no_query)
        scored, users = _rank(rankers, blocks, ks, f"{what}, {name}" if len(models) > 1 else what)
        results[name] = scored.pop(name)
        extra.update(scored)
        del rankers  # before the next model's: one copy of an item table at a time
    results.update(extra)
    if not more_like_this:
        return results, users
    like = {}
    for name, model in models.items():
        like[name], like["users"] = _more_like_this(_weights(model.item_table)[:vocab], blocks, ks)
    return results, users, like


def _no_query(user, history):
    """The query of a ranker that ignores it (popularity): [b, 1] ones, for the block's size."""
    return tf.ones([tf.shape(user)[0], 1])


def _rank(rankers: dict, blocks, ks, what: str) -> tuple[dict, int]:
    """({name: metrics}, users) of rankers {name: (ranker, query function)} over `blocks`."""
    metrics = {name: RankingMetrics(ks) for name in rankers}
    progress = Progress(_LOG, what, unit="users")
    for block in blocks:
        for name, (ranker, query) in rankers.items():
            top, _ = ranker(query(block["user"], block["history"]), block["seen"], max(ks))
            metrics[name].add(top, block["targets"])
        progress.add(int(block["user"].shape[0]))
    progress.done()
    return {name: m.result() for name, m in metrics.items()}, progress.count


def _more_like_this(items: np.ndarray, blocks, ks) -> tuple[dict, int]:
    """({"hit_rate@K": ...}, users) of an item table's neighbours (`evaluate`'s more_like_this)
    on the first `MORE_LIKE_THIS_USERS` users of `blocks` with a training item and a target."""
    unit = unit_rows(items)
    ranker, hits = TopK(unit), RankingMetrics(ks)
    for block in blocks:
        if hits.users >= MORE_LIKE_THIS_USERS:
            break
        newest = block["history"][:, -1].numpy()
        has = (newest >= 0) & (newest < len(items)) & (block["targets"].row_lengths().numpy() > 0)
        if has.any():
            rows = newest[has]
            first = tf.ragged.boolean_mask(block["targets"], has)[:, :1]
            itself = tf.RaggedTensor.from_row_lengths(rows, np.ones(len(rows), np.int64))
            top, _ = ranker(unit[rows], itself, max(ks))
            hits.add(top, first)
    return {f"hit_rate@{k}": hits.result()[f"recall@{k}"] for k in ks}, hits.users


def train(config: CollaborativeConfig, output_dir: str, *, epochs: int | None = None) -> dict:
    """Trains every configured model of a preprocessed collaborative run and evaluates them.

    Args:
        config: the run's collaborative config.
        output_dir: the run directory (preprocessed).
        epochs: at most this many epochs per model (default `training.epochs`).

    Returns:
        The `train` manifest section: test metrics of every model and of popularity, the model
        chosen on validation, validation curves, epoch losses, history weights, timings.
    """
    started = time.time()
    t, ev = config.training, config.evaluation
    keras.utils.set_random_seed(t.seed)
    tft_output = tft.TFTransformOutput(layout.transform_dir(output_dir))
    specs = {s.name: s for s in table_specs(config, tft_output)}
    data = Data(config, output_dir, specs)
    _LOG.info(
        "train: %d training interactions, %d eval users%s, %d items; validation: %.1f%% of users",
        data.train_pairs,
        data.eval_users,
        f" (sampled: {100 * data.eval_share:.1f}%)" if data.eval_share < 1 else "",
        data.items.vocabulary_size,
        100 * data.validation.share,
    )
    models, fits, history_weights, warm = {}, {}, {}, {}
    for name in t.models:
        model = build(name, data.users, data.items, config.max_history)
        warm[name] = _warm_start(model, config, specs, tft_output)
        fits[name] = fit(model, name, data, epochs=epochs or t.epochs)
        if t.refit and fits[name]["validation"]:
            # The validation slice chose the epochs; the model that serves learns from every pair.
            model = None
            gc.collect()  # the validated model's tables go before the refit's are made (below)
            keras.utils.set_random_seed(t.seed)
            model = build(name, data.users, data.items, config.max_history)
            _warm_start(model, config, specs, tft_output)
            fit(model, name, data, epochs=fits[name]["best_epoch"], validate=False)
        if hasattr(model, "history_weights"):
            history_weights[name] = model.history_weights()
            _LOG.info("%s: history weights, newest first: %s ...", name, history_weights[name][:10])
        save_model(model, layout.retrieval_tables_path(output_dir, name))
        models[name] = model
        # A fitted model's optimizer (lazy Adam's two slots per table row) and its traced
        # functions sit in reference cycles: freed now, their memory serves what comes next
        # (the next model, the evaluation) instead of staying beside it until a later collection.
        gc.collect()
    eval_started = time.time()
    results, evaluated, like = evaluate(
        models, data.eval_blocks(), data, what="evaluation (test holdout)", popularity=True, more_like_this=True
    )
    for name, metrics in results.items():
        _LOG.info("eval %s: %s", name, _fmt(metrics))
    for name in models:
        _LOG.info("more like this, %s item table: %s", name, _fmt(like[name]))
    headline = ev.headline
    validated = {name: f["validation"][f["best_epoch"] - 1] for name, f in fits.items() if f["validation"]}
    # Chosen on the validation slice; without one (validation_users: 0), the first model.
    best = max(validated, key=lambda m: validated[m][headline]) if validated else t.models[0]
    sampled = data.eval_share < 1
    section = {
        "models": list(t.models),
        "best_model": best,
        "chosen_on": "validation" if validated else "config order (no validation slice)",
        "refit": bool(t.refit and validated),
        "eval_metrics": results,
        "validation_metrics": validated,
        "more_like_this": like,
        "headline_metric": {"name": headline, "value": results[best][headline], "model": best},
        "epoch_losses": {name: f["losses"] for name, f in fits.items()},
        "validation_curves": {name: [m[headline] for m in f["validation"]] for name, f in fits.items()},
        "best_epochs": {name: f["best_epoch"] for name, f in fits.items()},
        "examples_per_s": {name: f["examples_per_s"] for name, f in fits.items()},
        "history_weights": history_weights,
        "evaluation": {
            "users": evaluated,
            "users_total": data.eval_users,
            "sampled": sampled,
            "validation_share": round(data.validation.share, 6),
            "validation_holdout": data.validation.holdout,
        },
        **({"warm_start": warm} if any(warm.values()) else {}),
        "tables": {n: {"rows": s.rows, "dim": s.dim} for n, s in specs.items()},
        "model_dir": layout.model_dir(output_dir),
        "timings_s": {"train": round(eval_started - started, 2), "evaluate": round(time.time() - eval_started, 2)},
    }
    update_manifest(output_dir, "train", section)
    return section


def _warm_start(model, config: CollaborativeConfig, specs: dict, tft_output) -> dict:
    """Copies the rows of the `init_from` tables (warm start, `embedpipe.runs.warm_start`) into
    `model`'s tables, matched by key; returns {table: match report}."""
    report = {}
    for side in (config.item, config.user):
        layer = model.item_table if side is config.item else getattr(model, "user_table", None)
        if side.init_from is None or layer is None:
            continue
        spec = specs[side.name]
        source = load_source(side.init_from.path, spec.dim, f"{config.source}: interactions.{side.name}", "warm-start")
        match = match_rows(table_keys(spec, tft_output), spec.oov_rows, source.keys, source.oov_rows)
        set_rows(layer, match.rows, source.vectors[match.source_rows])
        report[side.name] = {
            "source": source.path,
            "rows": spec.rows,
            "matched_keys": match.matched_keys,
            "match_rate": round(len(match.rows) / spec.rows, 4),
        }
        _LOG.info(
            "warm start: %s %d of %d rows from %s", side.name, len(match.rows), spec.rows, report[side.name]["source"]
        )
    return report


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

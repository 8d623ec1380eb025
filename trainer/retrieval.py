"""Collaborative training: item (and user) embeddings learned from watch histories, evaluated on
the temporal holdout.

Models (`training.models` of a collaborative config):

* `two_tower`: a user table and an item table; score(user, item) = u . v (matrix factorisation
  trained as retrieval);
* `bag_of_history`: a user is a weighted mean of the embeddings of the items in their history
  (the sparse "watched" vector embedded directly); score = mean_w(v_history) . v_item, one item
  table. The weights depend only on an item's position from the end of the history (newest
  first) and are learned: they start equal (a plain mean) and learn how much recent items
  matter more (on MovieLens they fall ~15x over the last 10 items; on histories without
  temporal structure they stay flat). They are in the manifest as `history_weights`.

Both train with an in-batch softmax over the batch's target items, corrected for candidate
popularity (logQ: the log of each item's share of training interactions is subtracted from its
logit) and with accidental hits (the same item twice in a batch) masked. Tables are
`trainer.sparse.SparseEmbedding`s updated by `SparseAwareOptimizer` (lazy Adam: only the rows
in the batch and their moments are touched), so a step costs the same for 5,000 or 500,000 items.

Evaluation ranks *all* items of the vocabulary (not the OOV rows) for every user with a holdout,
excluding the items the user saw in training, and reports Recall@K and NDCG@K; a popularity
ranking on the same split is reported beside the models.

Writes each model's `tables.npz` (float32 matrices, no pickle; `schemas.layout.retrieval_model_dir`)
and the `train` section of the manifest; `trainer.export` turns the best model's tables into
exported tables.
"""

from __future__ import annotations

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
from schemas.features import transformed_interaction_spec
from schemas.manifest import update_manifest
from schemas.tables import table_keys, table_specs
from trainer.model import set_rows
from trainer.sparse import SparseAwareOptimizer, SparseEmbedding
from trainer.tables import load_source, match_rows

_LOG = logging.getLogger(__name__)
EVAL_BLOCK_USERS = 1024


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

    def query(self, user, history: tf.RaggedTensor):
        """The recency-weighted mean of each history's newest `max_history` item vectors.

        Args:
            user: unused.
            history: int64 ragged [batch, (items)], rows of the item table, oldest first.

        Returns:
            float32 [batch, dim]; zeros for an empty history.
        """
        history = history[:, -self.recency.shape[0] :]
        vectors = self.item_table(history.values)
        lengths = history.row_lengths()
        from_end = tf.repeat(lengths, lengths) - 1 - tf.ragged.range(lengths).flat_values
        weights = tf.exp(tf.gather(self.recency, from_end))
        pooled = tf.math.unsorted_segment_sum(vectors * weights[:, None], history.value_rowids(), history.nrows())
        total = tf.math.unsorted_segment_sum(weights, history.value_rowids(), history.nrows())
        return pooled / tf.maximum(total, 1e-9)[:, None]  # an empty history gives a zero query

    def history_weights(self) -> list[float]:
        """Relative weight of each position from the end (newest first), the newest scaled to 1."""
        w = np.exp(self.recency.numpy().astype(np.float64))
        return [round(float(x), 4) for x in w / w[0]]

    def tables(self) -> dict[str, np.ndarray]:
        """The learned matrix: {"item": [items, dim]}, float32."""
        return {"item": _weights(self.item_table)}


def _init(dim: int) -> keras.initializers.Initializer:
    # Unit-scale dot products from the start: with Keras' default +-0.05 the logits are ~0 and
    # the first epochs barely move.
    return keras.initializers.RandomNormal(stddev=dim**-0.5)


def _weights(layer) -> np.ndarray:
    return np.asarray(layer.embeddings.numpy(), dtype=np.float32)


def load_split(pattern: str) -> dict:
    """All examples of a split as tensors: user, weight, and ragged history/targets/seen."""
    spec = transformed_interaction_spec()
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no transformed examples match {pattern!r}; run `embedpipe preprocess` first")
    parts = [tf.io.parse_example(b, spec) for b in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(65536)]
    return {k: tf.concat([p[k] for p in parts], axis=0) for k in spec}


def in_batch_softmax_loss(query, candidates, targets, log_q, weights):
    """Softmax over the batch's targets, logQ-corrected, accidental hits masked; weighted mean.

    Example i's positive is candidate i; the other examples' targets are its negatives, except
    those that are the same item (accidental hits, masked). Each candidate's logit is lowered by
    the log of its share of training interactions (logQ), which undoes the popularity bias of
    sampling negatives in proportion to it.

    Args:
        query: float32 [batch, dim], the users' query vectors.
        candidates: float32 [batch, dim], the target items' vectors.
        targets: int64 [batch], the target items' rows.
        log_q: float32 [items], log of each item's share of training interactions.
        weights: float32 [batch], each example's weight (0 drops it).

    Returns:
        The weighted mean cross-entropy, a float32 scalar.
    """
    logits = tf.matmul(query, candidates, transpose_b=True) - tf.gather(log_q, targets)[None, :]
    same = tf.equal(targets[:, None], targets[None, :])
    accidental = tf.logical_and(same, tf.logical_not(tf.eye(tf.shape(targets)[0], dtype=tf.bool)))
    logits = tf.where(accidental, tf.constant(-1e9, logits.dtype), logits)
    labels = tf.range(tf.shape(targets)[0])
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1e-9)


def fit(
    model, data: dict, log_q: tf.Tensor, *, batch_size: int, epochs: int, learning_rate: float, seed: int, name: str
):
    """Trains `model` on the train examples with the in-batch softmax.

    Args:
        model: a `TwoTower` or `BagOfHistory`.
        data: the train split (`load_split`).
        log_q: float32 [items] (see `in_batch_softmax_loss`).
        batch_size, epochs, learning_rate, seed: from `training:` of the config.
        name: the model's name, for the logs.

    Returns:
        The mean loss of each epoch.
    """
    needs_history = isinstance(model, BagOfHistory)
    weights = data["weight"] * (tf.cast(data["history"].row_lengths() > 0, tf.float32) if needs_history else 1.0)
    targets = data["targets"].flat_values  # one target per train example
    ds = tf.data.Dataset.from_tensor_slices((data["user"], data["history"], targets, weights))
    ds = ds.shuffle(len(targets), seed=seed, reshuffle_each_iteration=True).batch(batch_size, drop_remainder=True)
    # Tables go row-wise through lazy Adam; the few dense weights (history recency) through Adam.
    optimizer = SparseAwareOptimizer(
        learning_rate=learning_rate, algorithm="lazy_adam", dense_optimizer=keras.optimizers.Adam(learning_rate)
    )

    @tf.function
    def step(user, history, target, weight):
        with tf.GradientTape() as tape:
            loss = in_batch_softmax_loss(model.query(user, history), model.item_table(target), target, log_q, weight)
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    history = []
    for epoch in range(epochs):
        started, losses = time.time(), []
        for user, hist, target, weight in ds:
            losses.append(float(step(user, hist, target, weight)))
        history.append(float(np.mean(losses)))
        _LOG.info(
            "train %s: epoch %d/%d loss %.4f (%.1fs)", name, epoch + 1, epochs, history[-1], time.time() - started
        )
    return history


def evaluate(query: np.ndarray, items: np.ndarray, seen: tf.RaggedTensor, targets: tf.RaggedTensor, ks) -> dict:
    """Recall@K and NDCG@K of ranking every item for every query, seen items excluded.

    Args:
        query: float32 [users, dim].
        items: float32 [vocabulary rows, dim] (OOV rows left out: they are never ranked).
        seen: int64 ragged [users, (items)], excluded from each user's ranking.
        targets: int64 ragged [users, (items)], the held-out items; one outside the vocabulary
            counts as a miss.
        ks: the cut-offs.

    Returns:
        {"recall@K": mean over users, "ndcg@K": mean over users} for each K.
    """
    k_max = min(max(ks), items.shape[0])
    seen_rows, targets_rows = seen.to_list(), targets.to_list()
    recall = {k: 0.0 for k in ks}
    ndcg = {k: 0.0 for k in ks}
    discounts = 1.0 / np.log2(np.arange(2, k_max + 2))
    for start in range(0, len(query), EVAL_BLOCK_USERS):
        scores = query[start : start + EVAL_BLOCK_USERS] @ items.T
        for i, row in enumerate(seen_rows[start : start + EVAL_BLOCK_USERS]):
            row = [s for s in row if s < items.shape[0]]
            scores[i, row] = -np.inf
        top = np.argpartition(-scores, k_max - 1, axis=1)[:, :k_max]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        for i, wanted in enumerate(targets_rows[start : start + EVAL_BLOCK_USERS]):
            wanted = set(wanted)
            hits = np.isin(top[i], list(wanted))
            for k in ks:
                recall[k] += hits[:k].sum() / len(wanted)
                ideal = discounts[: min(len(wanted), k)].sum()
                ndcg[k] += (hits[:k] * discounts[:k]).sum() / ideal
    n = max(len(query), 1)
    return {**{f"recall@{k}": recall[k] / n for k in ks}, **{f"ndcg@{k}": ndcg[k] / n for k in ks}}


def train(config: CollaborativeConfig, output_dir: str, *, epochs: int | None = None) -> dict:
    """Trains every configured model of a preprocessed collaborative run and evaluates them.

    Args:
        config: the run's collaborative config.
        output_dir: the run directory (preprocessed).
        epochs: epochs per model (default `training.epochs`).

    Returns:
        The `train` manifest section: metrics of every model and of popularity, the best model
        (by the headline metric), epoch losses, history weights, timings.
    """
    started = time.time()
    t = config.training
    keras.utils.set_random_seed(t.seed)
    tft_output = tft.TFTransformOutput(layout.transform_dir(output_dir))
    specs = {s.name: s for s in table_specs(config, tft_output)}
    users, items = specs[config.user.name], specs[config.item.name]
    train_data = load_split(layout.examples_pattern(output_dir, layout.TRAIN))
    eval_data = load_split(layout.examples_pattern(output_dir, layout.EVAL))
    counts = np.bincount(train_data["targets"].flat_values.numpy(), minlength=items.rows).astype(np.float64)
    log_q = tf.constant(np.log(np.maximum(counts, 1.0) / counts.sum()), tf.float32)
    vocab = items.vocabulary_size
    results = {
        "popularity": evaluate(
            np.ones((len(eval_data["user"]), 1), np.float32),
            counts[:vocab, None].astype(np.float32),
            eval_data["seen"],
            eval_data["targets"],
            config.eval_k,
        )
    }
    _LOG.info(
        "train: %d train examples, %d eval users, %d items; popularity %s",
        len(train_data["user"]),
        len(eval_data["user"]),
        vocab,
        _fmt(results["popularity"]),
    )
    losses, history_weights, warm = {}, {}, {}
    for name in t.models:
        if name == "two_tower":
            model = TwoTower(users.rows, items.rows, users.dim, items.dim)
        else:
            model = BagOfHistory(items.rows, items.dim, config.max_history)
        warm[name] = _warm_start(model, config, specs, tft_output)
        losses[name] = fit(
            model,
            train_data,
            log_q,
            batch_size=t.batch_size,
            epochs=epochs or t.epochs,
            learning_rate=t.learning_rate,
            seed=t.seed,
            name=name,
        )
        query = model.query(eval_data["user"], eval_data["history"]).numpy()
        tables = model.tables()
        results[name] = evaluate(query, tables["item"][:vocab], eval_data["seen"], eval_data["targets"], config.eval_k)
        _LOG.info("eval %s: %s", name, _fmt(results[name]))
        if isinstance(model, BagOfHistory):
            history_weights[name] = model.history_weights()
            _LOG.info("%s: history weights, newest first: %s ...", name, history_weights[name][:10])
        path = layout.retrieval_tables_path(output_dir, name)
        tf.io.gfile.makedirs(os.path.dirname(path))
        buffer = io.BytesIO()
        np.savez(buffer, **tables)
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(buffer.getvalue())
    headline = f"recall@{20 if 20 in config.eval_k else max(config.eval_k)}"
    best = max(t.models, key=lambda m: results[m][headline])
    section = {
        "models": list(t.models),
        "best_model": best,
        "eval_metrics": results,
        "headline_metric": {"name": headline, "value": results[best][headline], "model": best},
        "epoch_losses": losses,
        "history_weights": history_weights,
        **({"warm_start": warm} if any(warm.values()) else {}),
        "tables": {n: {"rows": s.rows, "dim": s.dim} for n, s in specs.items()},
        "model_dir": layout.model_dir(output_dir),
        "timings_s": {"train": round(time.time() - started, 2)},
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

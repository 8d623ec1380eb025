"""Recommendations from a collaborative export: every user's vector, a SavedModel that turns raw
item keys into a query and top-k items, and the top-k items of every user in blocks.

    rec = Recommender("embedpipe_output/watchlogs/LATEST/export")
    rec.query([["m000001", "m000042"]])             # float32 [1, dim]: a vector for this history
    rec.recommend([["m000001", "m000042"]], k=10)   # [[(item key, score), ...]]: seen items excluded
    embedpipe recommend EXPORT --all -k 20          # EXPORT/recommendations.parquet

The export (`trainer.export`) writes, for the model chosen on validation:

* the `user` table (`export/user/`, like every table): each user's vector from their **full**
  history, held-out interactions included (the export serves tomorrow) — the model's own query
  of the newest `max_history` items for `bag_of_history` and `self_attention`, the learned row
  for `two_tower`; OOV user rows are zeros;
* `recommender/histories.parquet` (`schemas.layout.histories_path`): `user` (string), `items`
  (list<string>, item table keys, oldest first; an item below the vocabulary's thresholds appears
  as its OOV row's key, `<OOV 0>`) and `rows` (list<int32>, the same items' rows of this export's
  item table), at most the newest 10,000 training items and the held-out ones per user
  (`MAX_RECORD_ITEMS`);
* `recommender/saved_model/`, signatures:
  - `query(item_keys: string [batch, n]) -> {"vector": float32 [batch, dim]}`: a history per row,
    newest last, "" pads. A key of the item table maps to its row; any other key to an OOV row
    exactly as the preprocessing maps it (tf.Transform's vocabulary lookup hashes it into the OOV
    buckets). A two-tower user is a learned row, not a function of a history: for `two_tower`
    this is the plain mean of the items' vectors, the cold-start query;
  - `recommend(item_keys: string [batch, n], k: int32 []) -> {"items": string [batch, k],
    "scores": float32 [batch, k]}`: the best k vocabulary items by query . item vector, the
    history's own items excluded, best first;
* `recommender/manifest.json`: the model, dim, `max_history`, the signatures and the files.

For a user of the table, `query(their histories.parquet items)` is their exported vector
(`bag_of_history`, `self_attention`).
"""

from __future__ import annotations

import logging
import os

import keras
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tensorflow as tf

from schemas import layout
from schemas.progress import Progress
from schemas.tables import TableSpec
from trainer import sequences
from trainer.ranking import TopK, block_users
from trainer.retrieval import TwoTower
from trainer.streams import input_file, output_stream
from trainer.tables import EmbeddingTable, UnknownKeyError, load_table, sha256_file

_LOG = logging.getLogger(__name__)
WRITE_USERS = 8192  # users per row group of recommendations.parquet
APPROXIMATE_SEEN = 512  # the most seen items an approximate search asks extra candidates for
SAVED_MODEL = "saved_model"
MANIFEST = "manifest.json"
_HISTORIES_SCHEMA = pa.schema([("user", pa.string()), ("items", pa.list_(pa.string())), ("rows", pa.list_(pa.int32()))])
_RECOMMENDATIONS_SCHEMA = pa.schema(
    [("user", pa.string()), ("items", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))]
)


def user_vectors(
    model: keras.Model,
    histories,
    users: TableSpec,
    user_keys: list[str],
    item_keys: list[str],
    max_history: int,
    path: str,
) -> np.ndarray:
    """Every user's vector from their full history; writes the histories to `path` (Parquet).

    Args:
        model: the trained model (`trainer.retrieval`).
        histories: blocks of `trainer.sequences.user_histories`.
        users: the user table.
        user_keys, item_keys: the tables' keys, in row order.
        max_history: the model's history window H.
        path: where `histories.parquet` goes.

    Returns:
        float32 [users.rows, dim]: the model's query of each user's newest H items (for
        `two_tower`: its learned user table); OOV rows are zeros.
    """
    learned = isinstance(model, TwoTower)
    vectors = model.tables()["user"] if learned else np.zeros((users.rows, model.item_table.output_dim), np.float32)
    item_keys_array = pa.array(item_keys, pa.string())
    user_keys_array = np.asarray(user_keys, dtype=object)
    progress = Progress(_LOG, "export: user histories", total=users.vocabulary_size, unit="users")
    tf.io.gfile.makedirs(os.path.dirname(path))
    with output_stream(path) as f, pq.ParquetWriter(f, _HISTORIES_SCHEMA) as writer:
        for block in histories:
            user, items = block["user"].numpy(), block["items"]
            keep = user < users.vocabulary_size  # OOV rows have no key
            if not keep.all():
                user, items = user[keep], tf.ragged.boolean_mask(items, keep)
            if not len(user):
                continue
            if not learned:
                vectors[user] = model.history_query(sequences.newest(items, max_history)).numpy()
            flat = pa.array(items.flat_values.numpy().astype(np.int32))
            offsets = pa.array(items.row_splits.numpy().astype(np.int32))
            writer.write_table(
                pa.table(
                    {
                        "user": pa.array(user_keys_array[user], pa.string()),
                        "items": pa.ListArray.from_arrays(offsets, pc.take(item_keys_array, flat)),
                        "rows": pa.ListArray.from_arrays(offsets, flat),
                    },
                    schema=_HISTORIES_SCHEMA,
                )
            )
            progress.add(len(user))
    progress.done()
    return vectors


class Serving(tf.Module):
    """The recommender's SavedModel: `query` and `recommend` from raw item keys (module docstring).

    Args:
        model: the trained model (its `history_query` and `item_table`).
        items: the item table.
        item_keys: its keys, in row order.
        max_history: the model's history window H.
    """

    def __init__(self, model: keras.Model, items: TableSpec, item_keys: list[str], max_history: int):
        super().__init__()
        self.model = model
        self.vocabulary, self.oov_rows, self.max_history = items.vocabulary_size, items.oov_rows, max_history
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(item_keys, tf.string), tf.range(len(item_keys), dtype=tf.int64)
            ),
            default_value=-1,
        )
        self.keys = tf.constant(item_keys[: self.vocabulary], tf.string)

    def rows(self, item_keys: tf.Tensor) -> tf.Tensor:
        """string [b, n] -> int64 [b, n] item rows; -1 for "" (and, without OOV rows, unknown keys)."""
        rows = self.table.lookup(item_keys)
        if self.oov_rows:
            hashed = tf.strings.to_hash_bucket_fast(item_keys, self.oov_rows) + self.vocabulary
            rows = tf.where(rows >= 0, rows, hashed)
        return tf.where(item_keys == "", tf.constant(-1, tf.int64), rows)

    def history(self, rows: tf.Tensor) -> tf.Tensor:
        """int64 [b, n] rows (-1: none) -> [b, H]: the newest H of each row, right-aligned, -1 padded."""
        valid = rows >= 0
        from_end = tf.cumsum(tf.cast(valid, tf.int64), axis=1, reverse=True)  # 1 = the newest item
        keep = valid & (from_end <= self.max_history)
        where = tf.where(keep)
        column = self.max_history - tf.gather_nd(from_end, where)
        index = tf.stack([where[:, 0], column], axis=1)
        shape = tf.stack([tf.shape(rows, out_type=tf.int64)[0], self.max_history])
        return tf.scatter_nd(index, tf.gather_nd(rows, where) + 1, shape) - 1

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="item_keys")])
    def query(self, item_keys):
        return {"vector": self.model.history_query(self.history(self.rows(item_keys)))}

    @tf.function(
        input_signature=[tf.TensorSpec([None, None], tf.string, name="item_keys"), tf.TensorSpec([], tf.int32, "k")]
    )
    def recommend(self, item_keys, k):
        rows = self.rows(item_keys)
        query = self.model.history_query(self.history(rows))
        items = self.model.item_table.embeddings[: self.vocabulary]
        scores = tf.matmul(query, items, transpose_b=True)
        seen = tf.where((rows >= 0) & (rows < self.vocabulary))
        index = tf.stack([seen[:, 0], tf.gather_nd(rows, seen)], axis=1)
        scores = tf.tensor_scatter_nd_update(scores, index, tf.fill([tf.shape(index)[0]], -np.inf))
        top, best = tf.math.top_k(scores, tf.minimum(k, self.vocabulary))
        return {"items": tf.gather(self.keys, best), "scores": top}


def write_recommender(
    export_directory: str, model: keras.Model, model_name: str, items: TableSpec, item_keys: list[str], max_history: int
) -> dict:
    """Writes `recommender/saved_model` and its manifest (the histories are already there).

    Returns:
        The recommender's manifest.
    """
    path = layout.recommender_dir(export_directory)
    serving = Serving(model, items, item_keys, max_history)
    tf.saved_model.save(
        serving,
        os.path.join(path, SAVED_MODEL),
        signatures={"query": serving.query, "recommend": serving.recommend},
    )
    manifest = {
        "model": model_name,
        "dim": int(model.item_table.output_dim),
        "max_history": max_history,
        "items": items.vocabulary_size,
        "saved_model": {"path": SAVED_MODEL, "signatures": ["query", "recommend"]},
        "user_vectors": "learned user table" if isinstance(model, TwoTower) else "query of the full history",
        "files": {
            "histories": {
                "path": os.path.basename(layout.histories_path(export_directory)),
                "sha256": sha256_file(layout.histories_path(export_directory)),
            }
        },
    }
    layout.write_json_atomically(os.path.join(path, MANIFEST), manifest)
    return manifest


class Recommender:
    """The recommender of an export, from Python: vectors and top-k items for any history.

    Args:
        export_directory: a collaborative run's `export/` directory (a `.../LATEST/export` path
            resolves).
    """

    def __init__(self, export_directory: str):
        self.path = layout.recommender_dir(layout.resolve(export_directory))
        manifest = os.path.join(self.path, MANIFEST)
        if not tf.io.gfile.exists(manifest):
            raise FileNotFoundError(f"{export_directory}: no recommender (a collaborative export has one)")
        self.manifest = layout.read_json(manifest)
        self._model = tf.saved_model.load(os.path.join(self.path, SAVED_MODEL))

    def query(self, histories: list[list[str]]) -> np.ndarray:
        """Vectors for histories of item keys (oldest first; unknown keys map as in training).

        Args:
            histories: one list of item keys per user, newest last.

        Returns:
            float32 [len(histories), dim].
        """
        return self._model.signatures["query"](item_keys=_padded(histories))["vector"].numpy()

    def recommend(self, histories: list[list[str]], k: int = 10) -> list[list[tuple[str, float]]]:
        """The best `k` items for each history, its own items excluded.

        Returns:
            One list per history of (item key, score), best first.
        """
        out = self._model.signatures["recommend"](item_keys=_padded(histories), k=tf.constant(k, tf.int32))
        keys, scores = out["items"].numpy(), out["scores"].numpy()
        return [[(key.decode(), float(s)) for key, s in zip(row, row_scores)] for row, row_scores in zip(keys, scores)]


def _padded(histories: list[list[str]]) -> tf.Tensor:
    width = max([len(h) for h in histories] + [1])
    return tf.constant([list(h) + [""] * (width - len(h)) for h in histories], tf.string)


def _seen_rows(histories: pa.Table, vocabulary: int) -> tf.RaggedTensor:
    """The vocabulary rows of each history's items (ragged int64), OOV rows left out."""
    column = histories.column("rows").combine_chunks()
    rows = column.flatten().to_numpy().astype(np.int64)
    owner = np.repeat(np.arange(len(column)), np.diff(column.offsets.to_numpy()))
    keep = rows < vocabulary
    return tf.RaggedTensor.from_value_rowids(rows[keep], owner[keep], nrows=len(column))


def recommend_all(export_directory: str, k: int, path: str | None = None, index=None) -> dict:
    """Top-k items of every user of a collaborative export -> Parquet, in memory-bounded blocks.

    Scores are user vector . item vector (the model's own score); each user's history items are
    excluded; OOV rows are never recommended.

    Args:
        export_directory: a collaborative run's `export/` directory.
        k: items per user.
        path: the Parquet file (default `schemas.layout.recommendations_path`): columns `user`
            (string), `items` (list<string>), `scores` (list<float32>), best first.
        index: an approximate index of the item table's rows (`trainer.ann.HnswIndex`, metric
            dot), or None for the exact search. It is asked for k + (the block's longest history,
            at most `APPROXIMATE_SEEN`) candidates; a user left with fewer than k unseen ones
            gets the exact top-k.

    Returns:
        {"path", "users", "k", "seconds", "approximate"}.
    """
    export_directory = layout.resolve(export_directory)
    histories_file = layout.histories_path(export_directory)
    if not tf.io.gfile.exists(histories_file):
        raise FileNotFoundError(f"{export_directory}: no {histories_file}; `--all` needs a collaborative export")
    users, items = _tables(export_directory)
    ranker = TopK(items.vectors[: items.real_rows])
    k = min(k, items.real_rows)
    item_keys = np.asarray(items.keys[: items.real_rows], dtype=object)
    path = path or layout.recommendations_path(export_directory)
    block = block_users(items.real_rows)
    with input_file(histories_file) as f:
        source = pq.ParquetFile(f)
        progress = Progress(_LOG, "recommend --all", total=source.metadata.num_rows, unit="users")
        with output_stream(path) as out, pq.ParquetWriter(out, _RECOMMENDATIONS_SCHEMA) as writer:
            parts = []
            for batch in source.iter_batches(batch_size=block, columns=["user", "rows"]):
                histories = pa.Table.from_batches([batch])
                keys = histories.column("user").to_pylist()
                query = users.vectors[[users.row(key) for key in keys]]
                seen = _seen_rows(histories, items.real_rows)
                if index is None:
                    top, scores = ranker(query, seen, k)
                else:
                    extra = int(min(seen.row_lengths().numpy().max(initial=0), APPROXIMATE_SEEN))
                    top, scores = index.search_excluding(
                        query, seen, k, extra, lambda short, q=query, s=seen: ranker(q[short], tf.gather(s, short), k)
                    )
                parts.append((keys, top, scores.astype(np.float32)))
                progress.add(len(keys))
                if sum(len(p[0]) for p in parts) >= WRITE_USERS:  # row groups of ~WRITE_USERS users
                    writer.write_table(_recommendations(parts, item_keys))
                    parts = []
            if parts:
                writer.write_table(_recommendations(parts, item_keys))
        seconds = progress.done()
    return {
        "path": path,
        "users": progress.count,
        "k": k,
        "seconds": round(seconds, 1),
        "approximate": index is not None,
    }


def _recommendations(parts: list, item_keys: np.ndarray) -> pa.Table:
    """One Parquet row group of `recommend_all`: [(user keys, rows [b, k], scores [b, k])]."""
    keys = [key for part in parts for key in part[0]]
    top = np.concatenate([part[1] for part in parts])
    scores = np.concatenate([part[2] for part in parts])
    offsets = pa.array(np.arange(0, top.size + 1, max(top.shape[1], 1), dtype=np.int32))
    return pa.table(
        {
            "user": pa.array(keys, pa.string()),
            "items": pa.ListArray.from_arrays(offsets, pa.array(item_keys[top.ravel()], pa.string())),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(scores.ravel())),
        },
        schema=_RECOMMENDATIONS_SCHEMA,
    )


def recommend_users(export_directory: str, users: list[str], k: int = 10) -> dict[str, list[tuple[str, str, float]]]:
    """Top-k items for each of `users` of an export (user vector . item vector), the tables
    loaded once; each user's history items are excluded where the export has the histories.

    Returns:
        {user: [(item key, item label, score), ...]}, best first.

    Raises:
        UnknownKeyError: a user is not in the user table.
    """
    export_directory = layout.resolve(export_directory)
    user_table, items = _tables(export_directory)
    for user in users:
        if user not in user_table:
            raise UnknownKeyError(f"table 'user' has no key {user!r}")
    histories_file = layout.histories_path(export_directory)
    seen = {user: [] for user in users}
    if tf.io.gfile.exists(histories_file):
        with input_file(histories_file) as f:
            found = pq.read_table(f, filters=[("user", "in", list(users))])
        for user, rows in zip(found.column("user").to_pylist(), _seen_rows(found, items.real_rows).to_list()):
            seen[user] = rows
    ranker = TopK(items.vectors[: items.real_rows])
    query = user_table.vectors[[user_table.row(u) for u in users]]
    top, scores = ranker(query, tf.ragged.constant([seen[u] for u in users], tf.int64, ragged_rank=1), k)
    labels = items.labels or [""] * len(items.keys)
    return {
        user: [(items.keys[i], labels[i], float(s)) for i, s in zip(row, row_scores)]
        for user, row, row_scores in zip(users, top, scores)
    }


def _tables(export_directory: str) -> tuple[EmbeddingTable, EmbeddingTable]:
    user = os.path.join(export_directory, "user")
    if layout.table_manifest(user) is None:
        raise FileNotFoundError(f"{export_directory}: no user table (recommendations need a collaborative export)")
    return load_table(user), load_table(os.path.join(export_directory, "item"))

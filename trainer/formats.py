"""The downstream formats of one exported table, beyond keys/vectors/Parquet/projector files.

Written by `trainer.export.write_table` next to the other files of `<export>/<table>/`:

* `embedding.ckpt.index` + `embedding.ckpt.data-00000-of-00001` — a TensorFlow checkpoint
  holding one tensor, named after the table (`checkpoint.tensor_name` in the manifest), shaped
  `[rows, dim]` in row order, for `tf.feature_column.embedding_column(...,
  ckpt_to_load_from=<table>/embedding.ckpt, tensor_name_in_ckpt=<table name>)`;
* `vocabulary.txt` (vocabulary tables) — the raw keys of rows 0..V-1, one per line, UTF-8, for
  `categorical_column_with_vocabulary_file(..., num_oov_buckets=<oov_rows>)`;
* `vectors.w2v.txt` — word2vec text format (`<rows> <dim>` header, then `key v1 ... vd` per
  row) of the *real* rows (not OOV rows: `embedpipe neighbors` never returns them either), for
  `gensim.models.KeyedVectors.load_word2vec_format`. Keys are escaped as in keys.tsv and a
  space is written `\\s` (`trainer.tables.unescape_key` reverses both); values are printed with 9 significant digits, which reads back into
  exactly the same float32;
* `saved_model/` — a TensorFlow SavedModel with two signatures: `lookup` (`keys`: string [n] ->
  `vectors` float32 [n, dim]) and `neighbors` (`keys`: string [n], `k`: int32 -> `keys` string
  [n, k], `scores` float32 [n, k], cosine, the key itself and OOV rows excluded).

How a raw key finds its row (the same rule in the SavedModel, `trainer.layers.embedding_layer`
and the feature-column recipe, and the one the transform applied in training):

* vocabulary: its row if the key is in the vocabulary; otherwise OOV row
  `V + Fingerprint64(key) % oov_rows` (tf.Transform's and `tf.lookup`'s OOV hashing); a table
  without OOV rows gives a zero vector;
* identity: the integer key itself if 0 <= key < N, else the OOV row N;
* hash: `Fingerprint64(key) % rows` (`tf.strings.to_hash_bucket_fast`; an integer is hashed
  as its decimal string); a cross's key is its columns joined by the cross separator
  (`"Tue x 8"`);
* bucket: the row key itself (`<bucket 3>`); the boundaries live in the transform graph.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from trainer.tables import bad_vocabulary_key, escape_key, unit_rows

CHECKPOINT = "embedding.ckpt"
CHECKPOINT_FILES = {
    "checkpoint_index": CHECKPOINT + ".index",
    "checkpoint_data": CHECKPOINT + ".data-00000-of-00001",
}
VOCABULARY = "vocabulary.txt"
WORD2VEC = "vectors.w2v.txt"
SAVED_MODEL = "saved_model"


def write_checkpoint(path: str, name: str, vectors: np.ndarray) -> dict[str, str]:
    """One-tensor V2 checkpoint `<path>/embedding.ckpt` with tensor `name`; {file key: file name}."""
    tf.raw_ops.SaveV2(
        prefix=os.path.join(path, CHECKPOINT),
        tensor_names=[name],
        shape_and_slices=[""],
        tensors=[tf.constant(vectors)],
    )
    return dict(CHECKPOINT_FILES)


def write_vocabulary(path: str, table: str, keys: list[str], vocabulary_size: int) -> str:
    """The raw keys of the vocabulary rows, one per line (line-based, so no key may hold CR/LF)."""
    vocabulary = keys[:vocabulary_size]
    bad = bad_vocabulary_key(vocabulary)
    if bad is not None:
        raise ValueError(
            f"table {table}: key {bad!r} is empty or contains a line break and cannot be written to a "
            "vocabulary file (tf.Transform never puts such values in a vocabulary)"
        )
    with tf.io.gfile.GFile(os.path.join(path, VOCABULARY), "w") as f:
        f.write("".join(k + "\n" for k in vocabulary))
    return VOCABULARY


def write_word2vec(path: str, keys: list[str], vectors: np.ndarray, real_rows: int) -> str:
    """`vectors.w2v.txt`: the real rows, keys escaped with `escape_key(key, space=True)`."""
    with tf.io.gfile.GFile(os.path.join(path, WORD2VEC), "w") as f:
        f.write(f"{real_rows} {vectors.shape[1]}\n")
        for start, rows in iter_formatted_rows(vectors[:real_rows]):
            f.write("".join(f"{escape_key(k, space=True)} {row}\n" for k, row in zip(keys[start:], rows)))
    return WORD2VEC


def iter_formatted_rows(vectors: np.ndarray, separator: str = " ", block: int = 8192):
    """(first row, [row as text, ...]) per block of rows; 9 significant digits round-trip every
    float32 exactly. Blocks keep memory flat (the text of a 500k x 64 table is ~10x its bytes)."""
    for start in range(0, len(vectors), block):
        text = np.char.mod("%.9g", vectors[start : start + block].astype(np.float64)).tolist()
        yield start, [separator.join(row) for row in text]


class TableModule(tf.Module):
    """The SavedModel of one table: key -> row (module docstring rule), lookup and neighbours."""

    def __init__(self, kind: str, keys: list[str], vectors: np.ndarray, vocabulary_size: int | None, oov_rows: int):
        super().__init__()
        self.kind, self.rows, self.oov_rows = kind, len(keys), oov_rows
        self.real_rows = len(keys) - oov_rows
        self.vectors = tf.Variable(vectors, trainable=False, name="vectors")
        # unit-length real rows, stored rather than recomputed on every `neighbors` call
        self.unit = tf.Variable(unit_rows(vectors[: self.real_rows]), trainable=False, name="unit")
        self.keys = tf.Variable(keys, trainable=False, dtype=tf.string, name="keys")
        if kind in ("vocabulary", "identity", "bucket"):
            known = keys[: vocabulary_size if kind == "vocabulary" else self.real_rows]
            init = tf.lookup.KeyValueTensorInitializer(
                tf.constant(known, tf.string), tf.range(len(known), dtype=tf.int64)
            )
            buckets = oov_rows if kind != "bucket" else 0
            self.table = (
                tf.lookup.StaticVocabularyTable(init, num_oov_buckets=buckets)
                if buckets
                else tf.lookup.StaticHashTable(init, default_value=-1)
            )

    def rows_of(self, keys: tf.Tensor) -> tf.Tensor:
        """int64 row per key; -1 for a key with no row (zero vector)."""
        if self.kind == "hash":
            return tf.strings.to_hash_bucket_fast(keys, self.rows)
        return self.table.lookup(keys)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="keys")])
    def lookup(self, keys):
        """keys: string [n] -> {"vectors": float32 [n, dim]} (zeros for a key with no row)."""
        rows = self.rows_of(keys)
        vectors = tf.gather(self.vectors, tf.maximum(rows, 0))
        return {"vectors": tf.where((rows >= 0)[:, None], vectors, tf.zeros_like(vectors))}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="keys"), tf.TensorSpec([], tf.int32, name="k")])
    def neighbors(self, keys, k):
        """keys: string [n], k -> {"keys": string [n, k], "scores": float32 [n, k]}, cosine, best first."""
        rows = self.rows_of(keys)
        query = tf.math.l2_normalize(tf.gather(self.vectors, tf.maximum(rows, 0)), axis=1)
        scores = tf.matmul(query, self.unit, transpose_b=True)
        itself = tf.equal(rows[:, None], tf.range(self.real_rows, dtype=tf.int64)[None, :])
        # a key with no row (no OOV rows to fall back on) has no neighbours: every score -inf
        scores = tf.where(itself | (rows[:, None] < 0), tf.constant(-np.inf, scores.dtype), scores)
        top = tf.math.top_k(scores, k=tf.minimum(k, self.real_rows - 1))
        return {"keys": tf.gather(self.keys, top.indices), "scores": top.values}


def write_saved_model(
    path: str, kind: str, keys: list[str], vectors: np.ndarray, vocabulary_size: int | None, oov_rows: int
) -> dict[str, str]:
    """`<path>/saved_model/`; returns {file key: relative path} of every file written."""
    module = TableModule(kind, keys, vectors, vocabulary_size, oov_rows)
    target = os.path.join(path, SAVED_MODEL)
    tf.saved_model.save(module, target, signatures={"lookup": module.lookup, "neighbors": module.neighbors})
    files = {}
    for root, _, names in tf.io.gfile.walk(target):
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(root, name), path)
            files["saved_model:" + relative[len(SAVED_MODEL) + 1 :]] = relative
    return files

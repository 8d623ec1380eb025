"""Feature specs both sides of the transform agree on: raw columns in, transformed examples out.

The Beam job parses and transforms with these specs, the trainer parses the examples it wrote
with them, and serving takes the raw spec; TensorFlow only (no Beam, no Keras).

* supervised: one raw column per used `input.columns` entry (`raw_feature_spec`); the transformed
  spec comes from the transform output itself (`TFTransformOutput.transformed_feature_spec()`),
  with the label under `LABEL_KEY`;
* collaborative: one record per user and split (`sequence_feature_spec`; after the transform,
  with user and item rows: `transformed_sequence_spec`):

  - `user`: the user;
  - `items`: train: the user's training items, oldest first (a very long history is cut into
    chunks, each preceded by up to `max_history` items of context); eval: the user's training
    items (the newest `MAX_RECORD_ITEMS`), the history and seen set;
  - `start`: train: the position in `items` of the first item that is a training target (the
    ones before it are context); eval: `len(items)`;
  - `last`: 1 on the record that ends the user's training sequence (every eval record);
  - `targets`: eval: the held-out items, oldest first; train: empty;
  - `weights` (only with `interactions.weight`): the weight of each of `items`.
"""

from __future__ import annotations

import tensorflow as tf

from schemas.config import LABEL_KEY, Config

__all__ = [
    "LABEL_KEY",
    "LABEL_VOCABULARY",
    "LIST_FEATURES",
    "MAX_RECORD_ITEMS",
    "TF_TYPES",
    "WEIGHTS",
    "raw_feature_spec",
    "sequence_feature_spec",
    "transformed_sequence_spec",
]

TF_TYPES = {"int": tf.int64, "float": tf.float32, "string": tf.string}
# The multiclass label's vocabulary (the classes seen in training) is named after the label.
LABEL_VOCABULARY = LABEL_KEY
# The item lists of a collaborative record, and its per-item weights (when configured).
LIST_FEATURES = ("items", "targets")
WEIGHTS = "weights"
# The most items one record holds: a longer training sequence is cut into chunks of this many
# targets; an eval record keeps the newest this many training items as its history and seen set.
MAX_RECORD_ITEMS = 10_000


def raw_feature_spec(config: Config, include_label: bool = True) -> dict[str, tf.io.FixedLenFeature]:
    """{column: FixedLenFeature([], dtype)} of the used raw input columns (`used_columns`;
    serving: `include_label=False`)."""
    return {
        col: tf.io.FixedLenFeature([], TF_TYPES[kind])
        for col, kind in config.used_columns.items()
        if include_label or col != config.label.column
    }


def sequence_feature_spec(weighted: bool) -> dict:
    """Raw (pre-transform) spec of the collaborative records: string keys, int64 positions."""
    spec = {
        "user": tf.io.FixedLenFeature([], tf.string),
        "start": tf.io.FixedLenFeature([], tf.int64),
        "last": tf.io.FixedLenFeature([], tf.int64),
    }
    spec.update({name: tf.io.VarLenFeature(tf.string) for name in LIST_FEATURES})
    if weighted:
        spec[WEIGHTS] = tf.io.VarLenFeature(tf.float32)
    return spec


def transformed_sequence_spec(weighted: bool) -> dict:
    """Parse spec of the transformed collaborative records: int64 `user` row, `start`, `last`,
    ragged int64 item rows per list feature, ragged float `weights` when weighted."""
    spec = {
        "user": tf.io.FixedLenFeature([], tf.int64),
        "start": tf.io.FixedLenFeature([], tf.int64),
        "last": tf.io.FixedLenFeature([], tf.int64),
    }
    spec.update({name: tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64) for name in LIST_FEATURES})
    if weighted:
        spec[WEIGHTS] = tf.io.RaggedFeature(tf.float32, row_splits_dtype=tf.int64)
    return spec

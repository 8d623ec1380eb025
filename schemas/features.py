"""Feature specs both sides of the transform agree on: raw columns in, transformed examples out.

The Beam job parses and transforms with these specs, the trainer parses the examples it wrote
with them, and serving takes the raw spec; TensorFlow only (no Beam, no Keras).

* supervised: one raw column per `input.columns` entry (`raw_feature_spec`); the transformed
  spec comes from the transform output itself (`TFTransformOutput.transformed_feature_spec()`),
  with the label under `LABEL_KEY`;
* collaborative: the interaction examples the job builds per user (`interaction_feature_spec`:
  `user`, `weight` and the item lists `LIST_FEATURES`), and the same after the transform, with
  user and item ids (`transformed_interaction_spec`).
"""

from __future__ import annotations

import tensorflow as tf

from schemas.config import LABEL_KEY, Config

__all__ = [
    "LABEL_KEY",
    "LABEL_VOCABULARY",
    "LIST_FEATURES",
    "TF_TYPES",
    "interaction_feature_spec",
    "raw_feature_spec",
    "transformed_interaction_spec",
]

TF_TYPES = {"int": tf.int64, "float": tf.float32, "string": tf.string}
# The multiclass label's vocabulary (the classes seen in training) is named after the label.
LABEL_VOCABULARY = LABEL_KEY
# Item-id lists of a collaborative example: the user's history, the target item(s), and the
# items to exclude from the ranking at evaluation.
LIST_FEATURES = ("history", "targets", "seen")


def raw_feature_spec(config: Config, include_label: bool = True) -> dict[str, tf.io.FixedLenFeature]:
    """{column: FixedLenFeature([], dtype)} of the raw input columns (serving: `include_label=False`)."""
    return {
        col: tf.io.FixedLenFeature([], TF_TYPES[kind])
        for col, kind in config.input.columns.items()
        if include_label or col != config.label.column
    }


def interaction_feature_spec() -> dict:
    """Raw (pre-transform) spec of the collaborative examples: `user` and `weight` scalars, the
    item lists as string keys."""
    spec = {"user": tf.io.FixedLenFeature([], tf.string), "weight": tf.io.FixedLenFeature([], tf.float32)}
    spec.update({name: tf.io.VarLenFeature(tf.string) for name in LIST_FEATURES})
    return spec


def transformed_interaction_spec() -> dict:
    """Spec of the transformed collaborative examples: int64 `user` row, float `weight`, and
    ragged int64 item rows per list feature."""
    spec = {"user": tf.io.FixedLenFeature([], tf.int64), "weight": tf.io.FixedLenFeature([], tf.float32)}
    spec.update({name: tf.io.RaggedFeature(tf.int64) for name in LIST_FEATURES})
    return spec

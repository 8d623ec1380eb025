"""The tf.Transform `preprocessing_fn`, built from a `Config` and nothing else.

Every piece of feature logic lives here, once: it runs in Beam over the training data and is
baked into the transform graph that serving applies to raw features. Outputs:

* one int64 id per categorical feature and cross, named after the feature (rows of its table);
* one float per numeric feature (z-scored unless `normalize: none`), and `<name>_bucket` ids
  where `bucketize` is set;
* `label` (float for regression, 0/1 for binary, class index for multiclass, with one extra
  class for values never seen in training).

Vocabularies are named after their feature (`vocab_filename=<feature>`) so the trainer and the
exporter find them with `TFTransformOutput.vocabulary_by_name(<feature>)`.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_transform as tft

from schemas.config import CategoricalFeature, Config
from schemas.features import LABEL_KEY, LABEL_VOCABULARY


def make_preprocessing_fn(config: Config):
    """Returns `preprocessing_fn(inputs) -> outputs` for `config` (pure: no I/O, no globals)."""

    def preprocessing_fn(inputs: dict) -> dict:
        outputs = {}
        for feature in config.categorical:
            outputs[feature.name] = _categorical_ids(feature, inputs)
        for numeric in config.numeric:
            x = tf.cast(inputs[numeric.column], tf.float32)
            outputs[numeric.name] = tft.scale_to_z_score(x) if numeric.normalize == "zscore" else x
            if numeric.bucketize:
                outputs[numeric.bucket_feature] = tft.bucketize(x, numeric.bucketize)
        outputs[LABEL_KEY] = _label(config, inputs[config.label.column])
        return outputs

    return preprocessing_fn


def cross_values(feature: CategoricalFeature, inputs: dict) -> tf.Tensor:
    """The crossed value as a string, e.g. 'Tue x 2': the key of a vocabulary cross's row."""
    parts = [_as_string(inputs[c]) for c in feature.columns]
    return tf.strings.join(parts, separator=feature.separator)


def _categorical_ids(feature: CategoricalFeature, inputs: dict) -> tf.Tensor:
    x = cross_values(feature, inputs) if feature.is_cross else inputs[feature.columns[0]]
    if feature.type == "vocabulary":
        return tft.compute_and_apply_vocabulary(
            x,
            top_k=feature.top_k,
            frequency_threshold=feature.min_count if feature.min_count > 1 else None,
            num_oov_buckets=feature.oov_buckets,
            vocab_filename=feature.name,
            weights=unit_weights(x),
        )
    if feature.type == "identity":
        n = feature.num_buckets
        x = tf.cast(x, tf.int64)
        # Values outside [0, num_buckets) share the one OOV row at index num_buckets.
        return tf.where((x >= 0) & (x < n), x, tf.constant(n, tf.int64))
    return tf.strings.to_hash_bucket_fast(_as_string(x), feature.hash_buckets)


def _label(config: Config, y: tf.Tensor) -> tf.Tensor:
    task = config.label.task
    if task == "regression":
        return tf.cast(y, tf.float32)
    if task == "binary":
        if config.label.positive is not None:
            return tf.cast(tf.equal(_as_string(y), config.label.positive), tf.int64)
        if config.label.threshold is not None:
            return tf.cast(tf.cast(y, tf.float64) >= config.label.threshold, tf.int64)
        return tf.cast(tf.not_equal(y, 0), tf.int64)
    # One OOV class (index = number of classes seen in training) for classes only eval has.
    return tft.compute_and_apply_vocabulary(
        y, num_oov_buckets=1, vocab_filename=LABEL_VOCABULARY, weights=unit_weights(y)
    )


def unit_weights(x: tf.Tensor) -> tf.Tensor:
    """A weight of 1 per value: the same vocabulary as no weights (counts, thresholds and ties
    are unchanged), counted much faster. Unweighted, tf.Transform sends every value of every
    batch to Beam as its own element to count; weighted, each batch is reduced in the graph to
    its distinct values and their summed weights first."""
    return tf.ones_like(x, dtype=tf.float32)


def _as_string(x: tf.Tensor) -> tf.Tensor:
    return x if x.dtype == tf.string else tf.strings.as_string(x)

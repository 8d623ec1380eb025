"""tf.data input: the transformed gzip TFRecords, parsed with the transform output's feature spec."""

from __future__ import annotations

import tensorflow as tf

from schemas.features import LABEL_KEY


def make_dataset(
    file_pattern: str,
    feature_spec: dict,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    label_shape_1: bool,
    num_rows: int | None = None,
) -> tf.data.Dataset:
    """(features, label) batches of the transformed examples; cached in memory after one read.

    Args:
        file_pattern: the split's gzip TFRecord shards.
        feature_spec: the transformed features to parse (the label under `LABEL_KEY`).
        batch_size: examples per batch.
        shuffle: shuffle (the training split) with `seed`, anew each epoch.
        seed: the shuffle seed.
        label_shape_1: labels as [batch, 1] (regression, binary) rather than [batch].
        num_rows: the split's rows (from the run manifest), so Keras can show progress.

    Returns:
        A dataset of ({feature: [batch]}, label) pairs.

    Raises:
        FileNotFoundError: no file matches `file_pattern`.
    """
    files = tf.io.gfile.glob(file_pattern)
    if not files:
        raise FileNotFoundError(f"no transformed examples match {file_pattern!r}; run `embedpipe preprocess` first")
    ds = tf.data.TFRecordDataset(sorted(files), compression_type="GZIP").cache()
    if shuffle:
        ds = ds.shuffle(200_000, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if num_rows is not None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(-(-num_rows // batch_size)))

    def parse(serialized):
        features = tf.io.parse_example(serialized, feature_spec)
        label = features.pop(LABEL_KEY)
        return features, (tf.expand_dims(label, -1) if label_shape_1 else label)

    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

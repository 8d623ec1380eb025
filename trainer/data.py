"""tf.data input of the supervised trainer: the transformed gzip TFRecords, streamed.

The split's shards are read in parallel (in a new random order each epoch for the training
split), go through a bounded shuffle buffer of serialized examples and are parsed in batches
with the transform output's feature spec. A split is cached in memory after its first read only
when it fits the memory budget (`training.cache_max_mb`); otherwise every epoch reads the files
again, so memory never grows with the data.
"""

from __future__ import annotations

import tensorflow as tf

from schemas.features import LABEL_KEY

# Serialized tf.Examples take about this many times their gzip size in memory (an upper estimate).
CACHE_EXPANSION = 6
READ_CYCLE = 4  # shards read at once
SLICE_BATCH = 4096  # serialized examples sorted into the validation slice or not at once


def record_files(pattern: str) -> list[str]:
    """The split's shards, sorted; FileNotFoundError when there are none."""
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no transformed examples match {pattern!r}; run `embedpipe preprocess` first")
    return files


def read_records(files: list[str], *, shuffle: bool, seed: int) -> tf.data.Dataset:
    """The serialized records of gzip TFRecord `files`, `READ_CYCLE` shards read in parallel
    (deterministically interleaved); with `shuffle`, the shards in a random order by `seed`,
    anew each epoch."""
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(READ_CYCLE, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def in_slice(serialized: tf.Tensor, feature_spec: dict, percent: int) -> tf.Tensor:
    """Which serialized examples are in the validation slice of `make_dataset`.

    An example is in when the FarmHash fingerprint of its parsed values (every feature of
    `feature_spec`, in name order) falls in the first `percent` of 100 buckets: its content
    decides, not its bytes (a tf.Example's feature map serializes in no fixed order) nor the
    shard it was written to.

    Args:
        serialized: string [n], serialized tf.Examples.
        feature_spec: their features, each a `FixedLenFeature([])`.
        percent: the slice's share of 100.

    Returns:
        bool [n].
    """
    parsed = tf.io.parse_example(serialized, feature_spec)
    values = tf.stack([tf.strings.as_string(parsed[name]) for name in sorted(feature_spec)], axis=1)
    return tf.strings.to_hash_bucket_fast(tf.strings.reduce_join(values, axis=1, separator="\x1f"), 100) < percent


def make_dataset(
    file_pattern: str,
    feature_spec: dict,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    label_shape_1: bool,
    num_rows: int | None = None,
    shuffle_buffer: int = 200_000,
    cache_max_bytes: int = 256 << 20,
    slice_percent: int = 0,
    validation: bool = False,
) -> tf.data.Dataset:
    """(features, label) batches of the transformed examples.

    Args:
        file_pattern: the split's gzip TFRecord shards.
        feature_spec: the transformed features to parse (the label under `LABEL_KEY`).
        batch_size: examples per batch.
        shuffle: shuffle (the training split) with `seed`, anew each epoch: the shards' order
            and the examples, through a buffer of `shuffle_buffer` serialized examples.
        seed: the shuffle seed.
        label_shape_1: labels as [batch, 1] (regression, binary) rather than [batch].
        num_rows: the split's rows (from the run manifest), so Keras can show progress.
        shuffle_buffer: examples in the shuffle buffer.
        cache_max_bytes: cache the split in memory only if its files are at most
            `cache_max_bytes / CACHE_EXPANSION` bytes (0: never cache).
        slice_percent: carve a validation slice out of the split: the examples whose values
            fingerprint into the first `slice_percent` of 100 buckets (`in_slice`: the same
            examples every epoch and run, whatever the read order). 0: the whole split.
        validation: with `slice_percent`, the slice itself; else the rest of the split.

    Returns:
        A dataset of ({feature: [batch]}, label) pairs.

    Raises:
        FileNotFoundError: no file matches `file_pattern`.
    """
    files = record_files(file_pattern)
    ds = read_records(files, shuffle=shuffle, seed=seed)
    size = sum(tf.io.gfile.stat(f).length for f in files)  # on disk (a slice: its share, below)
    if slice_percent:

        def keep(serialized):
            return tf.boolean_mask(serialized, tf.equal(in_slice(serialized, feature_spec, slice_percent), validation))

        ds = ds.batch(SLICE_BATCH).map(keep, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        size = size * (slice_percent if validation else 100 - slice_percent) // 100
    if size * CACHE_EXPANSION <= cache_max_bytes:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if num_rows is not None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(-(-num_rows // batch_size)))

    def parse(serialized):
        features = tf.io.parse_example(serialized, feature_spec)
        label = features.pop(LABEL_KEY)
        return features, (tf.expand_dims(label, -1) if label_shape_1 else label)

    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

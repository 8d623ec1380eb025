"""The supervised trainer's tf.data input: shards streamed in parallel, shuffled within bounds."""

import os

import pytest
import tensorflow as tf

from trainer.data import make_dataset


def _shards(folder, shards=3, rows=40) -> str:
    for s in range(shards):
        with tf.io.TFRecordWriter(os.path.join(folder, f"train-{s:05d}-of-{shards:05d}.tfrecord.gz"), "GZIP") as w:
            for i in range(rows):
                x = s * rows + i
                feature = {"x": tf.train.Feature(int64_list=tf.train.Int64List(value=[x])),
                           "label": tf.train.Feature(float_list=tf.train.FloatList(value=[x / 10]))}  # fmt: skip
                w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return os.path.join(folder, "train-*.tfrecord.gz")


SPEC = {"x": tf.io.FixedLenFeature([], tf.int64), "label": tf.io.FixedLenFeature([], tf.float32)}


def _epoch(ds) -> list[int]:
    return [int(x) for features, _ in ds for x in features["x"].numpy()]


@pytest.mark.parametrize("cache_max_bytes", [0, 1 << 30])  # streamed from the files every epoch, or cached
def test_every_example_once_per_epoch_in_a_new_order(tmp_path, cache_max_bytes):
    pattern = _shards(str(tmp_path))
    ds = make_dataset(pattern, SPEC, 16, shuffle=True, seed=1, label_shape_1=True, num_rows=120,
                      shuffle_buffer=50, cache_max_bytes=cache_max_bytes)  # fmt: skip
    first, second = _epoch(ds), _epoch(ds)
    assert sorted(first) == sorted(second) == list(range(120))
    assert first != second and first != list(range(120))


def test_eval_split_is_read_in_file_order(tmp_path):
    pattern = _shards(str(tmp_path), shards=2, rows=5)
    ds = make_dataset(pattern, SPEC, 4, shuffle=False, seed=0, label_shape_1=False)
    assert _epoch(ds) == [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]  # both shards read at once, interleaved
    features, label = next(iter(ds))
    assert label.shape == (4,) and label.numpy()[1] == pytest.approx(0.5)


@pytest.mark.parametrize("cache_max_bytes", [0, 1 << 30])
def test_a_validation_slice_is_the_same_examples_every_epoch_and_never_trained_on(tmp_path, cache_max_bytes):
    pattern = _shards(str(tmp_path))
    kwargs = dict(seed=1, label_shape_1=True, shuffle_buffer=50, cache_max_bytes=cache_max_bytes, slice_percent=20)
    fit = make_dataset(pattern, SPEC, 16, shuffle=True, validation=False, **kwargs)
    held = make_dataset(pattern, SPEC, 16, shuffle=False, validation=True, **kwargs)
    sliced, rest = _epoch(held), _epoch(fit)
    assert sorted(sliced + rest) == list(range(120)) and not set(sliced) & set(rest)
    assert 8 <= len(sliced) <= 40  # about 20% of 120
    assert _epoch(held) == sliced and sorted(_epoch(fit)) == sorted(rest)  # a fixed slice, reshuffled rest

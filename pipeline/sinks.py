"""The Beam sink of the transformed examples: whole RecordBatches to gzip TFRecord shards.

`pipeline.transforms.WriteExamples` writes through it.
"""

from __future__ import annotations

import logging

import apache_beam as beam
import tensorflow as tf
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from tfx_bsl.public import tfxio

from schemas.progress import Progress

_LOG = logging.getLogger(__name__)


class ExampleBatchSink(filebasedsink.FileBasedSink):
    """A FileBasedSink whose records are whole `(RecordBatch, passthrough)` pairs; each shard is a
    gzip TFRecord file written by `tf.io.TFRecordWriter`, so on any path TensorFlow can write
    (local, gs://; the trainer reads the same paths with tf.data). Beam's shard limits
    (max_records_per_shard, max_bytes_per_shard) are not offered: they would count batches,
    and Beam's byte counter wraps its own file handles."""

    def __init__(self, file_prefix: str, num_shards: int = 0):
        super().__init__(
            file_prefix,
            coder=beam.coders.BytesCoder(),  # unused: write_record encodes whole batches itself
            file_name_suffix=".tfrecord.gz",
            num_shards=num_shards,  # 0: one per bundle, as the runner splits the work
            mime_type="application/octet-stream",
            compression_type=CompressionTypes.UNCOMPRESSED,  # the TFRecord writer compresses
        )

    def open(self, temp_path):
        writer = tf.io.TFRecordWriter(temp_path, tf.io.TFRecordOptions(compression_type="GZIP"))
        return writer, Progress(_LOG, "preprocess: examples written (this shard)", unit="examples")

    def write_record(self, file_handle, element):
        writer, progress = file_handle
        batch, _ = element
        for record in tfxio.RecordBatchToExamplesEncoder().encode(batch):
            writer.write(record)
        progress.add(batch.num_rows)

    def close(self, file_handle):
        file_handle[0].close()

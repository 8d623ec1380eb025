"""The named PTransforms the preprocessing jobs are composed of.

    ReadRawLogs | ParseAndValidate | SplitTrainEval | TransformAndWrite

`TransformAndWrite` runs tf.Transform (analyze on train, apply to both splits) and writes the
examples (`WriteExamples`), the transform graph and `CountIds` (how often each table row occurs
in the transformed training data, the `frequency` of the exports); `WriteDeadLetters` writes
every rejected row with its reason. The row-level logic itself is in `pipeline.rows`; these
wrappers add batching, tagging and counters.
"""

from __future__ import annotations

import json
import logging
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import tensorflow_transform.beam as tft_beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.public import tfxio
from tfx_bsl.tfxio import tensor_representation_util
from tfx_bsl.tfxio.parquet_tfxio import ParquetTFXIO

from pipeline import rows
from schemas.config import Config

NAMESPACE = "embedpipe"
DEAD = "dead"
TRAIN = "train"
EVAL = "eval"
CSV_BATCH_LINES = 8192
PROGRESS_EVERY_ROWS = 200_000

_LOG = logging.getLogger(__name__)


class _ReadProgress:
    """Logs how many rows this worker has read, every PROGRESS_EVERY_ROWS rows."""

    def __init__(self):
        self.rows = 0
        self.next_report = PROGRESS_EVERY_ROWS

    def add(self, n: int, source: str) -> None:
        self.rows += n
        if self.rows >= self.next_report:
            _LOG.info("read %d rows so far on this worker (now reading %s)", self.rows, source)
            self.next_report += PROGRESS_EVERY_ROWS


class ReadRawLogs(beam.PTransform):
    """Reads the configured input into `(source, RecordBatch)` pairs, plus dead letters.

    CSV is read line by line (splittable across workers) and parsed in batches with pyarrow, so
    a malformed line becomes a dead letter instead of failing the job; Parquet goes through
    tfx_bsl's `ParquetTFXIO`. Returns a `DoOutputsTuple` with the main output and `DEAD`.

        batches = pipeline | ReadRawLogs(config)
        batches[None], batches[DEAD]
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    def expand(self, pbegin):
        inp = self.config.input
        if inp.format == "csv":
            lines = pbegin | "ReadLines" >> beam.io.ReadFromTextWithFilename(
                inp.path, skip_header_lines=1 if inp.header else 0, coder=beam.coders.BytesCoder()
            )
            return lines | "ParseCsv" >> beam.ParDo(_ParseCsvLines(self.config)).with_outputs(DEAD, main="rows")
        source = ParquetTFXIO(inp.path, column_names=self.config.raw_columns)
        batches = (
            pbegin
            | "ReadParquet" >> source.BeamSource()
            | "TagSource" >> beam.ParDo(_TagParquetBatches(inp.path)).with_outputs(DEAD, main="rows")
        )
        return batches


class _ParseCsvLines(beam.DoFn):
    """Buffers (filename, line) pairs per file and parses them in batches."""

    def __init__(self, config: Config):
        self.config = config
        self.rows_read = Metrics.counter(NAMESPACE, "rows_read")

    def setup(self):
        self._progress = _ReadProgress()

    def start_bundle(self):
        self._buffers: dict[str, list[bytes]] = {}

    def process(self, element):
        source, line = element
        buffer = self._buffers.setdefault(source, [])
        buffer.append(line.rstrip(b"\r"))
        if len(buffer) >= CSV_BATCH_LINES:
            yield from self._flush(source)

    def finish_bundle(self):
        for source in list(self._buffers):
            for out in self._flush(source):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, -1, [GlobalWindow()]))
                else:
                    yield WindowedValue(out, -1, [GlobalWindow()])

    def _flush(self, source):
        lines = self._buffers.pop(source)
        self.rows_read.inc(len(lines))
        self._progress.add(len(lines), source)
        batch, dead = rows.parse_csv_lines(lines, self.config, source)
        for letter in dead:
            yield beam.pvalue.TaggedOutput(DEAD, letter)
        if batch.num_rows:
            yield source, batch


class _TagParquetBatches(beam.DoFn):
    def __init__(self, source: str):
        self.source = source
        self.rows_read = Metrics.counter(NAMESPACE, "rows_read")

    def setup(self):
        self._progress = _ReadProgress()

    def process(self, batch: pa.RecordBatch):
        self.rows_read.inc(batch.num_rows)
        self._progress.add(batch.num_rows, self.source)
        yield self.source, batch


class ParseAndValidate(beam.PTransform):
    """`(source, batch)` -> canonical RecordBatches (main) and dead letters (`DEAD`)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    def expand(self, batches):
        return batches | "Validate" >> beam.ParDo(_Validate(self.config)).with_outputs(DEAD, main="rows")


class _Validate(beam.DoFn):
    def __init__(self, config: Config):
        self.config = config
        self.rows_valid = Metrics.counter(NAMESPACE, "rows_valid")

    def process(self, element):
        source, batch = element
        good, dead = rows.validate_batch(batch, self.config, source)
        for letter in dead:
            yield beam.pvalue.TaggedOutput(DEAD, letter)
        if good.num_rows:
            self.rows_valid.inc(good.num_rows)
            yield good


class SplitTrainEval(beam.PTransform):
    """Canonical batches -> `TRAIN` and `EVAL` outputs, by a fingerprint of the split key."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    def expand(self, batches):
        return batches | "Split" >> beam.ParDo(_Split(self.config)).with_outputs(TRAIN, EVAL)


class _Split(beam.DoFn):
    def __init__(self, config: Config):
        self.config = config
        self.counters = {t: Metrics.counter(NAMESPACE, f"rows_{t}") for t in (TRAIN, EVAL)}

    def process(self, batch: pa.RecordBatch):
        is_eval = rows.eval_mask(batch, self.config)
        for tag, mask in ((EVAL, is_eval), (TRAIN, ~is_eval)):
            if mask.any():
                part = batch.filter(pa.array(mask))
                self.counters[tag].inc(part.num_rows)
                yield beam.pvalue.TaggedOutput(tag, part)


def tensor_adapter_config(feature_spec: dict, arrow_schema: pa.Schema) -> tfxio.TensorAdapterConfig:
    """How tf.Transform turns RecordBatches in `arrow_schema` into the tensors of `feature_spec`."""
    schema = schema_utils.schema_from_feature_spec(feature_spec)
    return tfxio.TensorAdapterConfig(
        arrow_schema=arrow_schema,
        tensor_representations=tensor_representation_util.InferTensorRepresentationsFromSchema(schema),
    )


class TransformAndWrite(beam.PTransform):
    """{TRAIN: batches, EVAL: batches} -> tf.Transform outputs written under `out`.

    Analyzes the training split only, applies the transform to both, and writes
    `out/transform/` (WriteTransformFn), `out/data/{train,eval}-*.tfrecord.gz` and
    `out/id_counts.json` (`id_columns` maps each table to its transformed id column).
    """

    def __init__(self, preprocessing_fn, adapter: tfxio.TensorAdapterConfig, out: str, id_columns: dict[str, str]):
        super().__init__()
        self.preprocessing_fn = preprocessing_fn
        self.adapter = adapter
        self.out = out
        self.id_columns = id_columns

    def expand(self, splits):
        (train, _), transform_fn = (splits[TRAIN], self.adapter) | "AnalyzeAndTransform" >> tft_beam.AnalyzeAndTransformDataset(
            self.preprocessing_fn, output_record_batches=True
        )
        eval_, _ = ((splits[EVAL], self.adapter), transform_fn) | "TransformEval" >> tft_beam.TransformDataset(
            output_record_batches=True
        )
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(os.path.join(self.out, "transform"))
        _ = train | "WriteTrain" >> WriteExamples(os.path.join(self.out, "data", TRAIN))
        _ = eval_ | "WriteEval" >> WriteExamples(os.path.join(self.out, "data", EVAL))
        return train | "CountIds" >> CountIds(self.id_columns, os.path.join(self.out, "id_counts.json"))


class WriteExamples(beam.PTransform):
    """Transformed `(RecordBatch, passthrough)` pairs -> gzip TFRecord shards of tf.Examples."""

    def __init__(self, file_prefix: str):
        super().__init__()
        self.file_prefix = file_prefix

    def expand(self, transformed):
        return (
            transformed
            | "EncodeExamples" >> beam.FlatMap(_encode_examples)
            | "WriteTFRecords"
            >> beam.io.WriteToTFRecord(
                self.file_prefix,
                file_name_suffix=".tfrecord.gz",
                compression_type=beam.io.filesystem.CompressionTypes.GZIP,
            )
        )


def _encode_examples(element):
    batch, _ = element
    return tfxio.RecordBatchToExamplesEncoder().encode(batch)


class WriteDeadLetters(beam.PTransform):
    """Dead letters (one PCollection or several) -> JSON lines (`reason`, `detail`, `source`,
    `row`), counted per reason."""

    def __init__(self, file_prefix: str):
        super().__init__()
        self.file_prefix = file_prefix

    def expand(self, letters):
        if isinstance(letters, (tuple, list)):
            letters = letters | "Collect" >> beam.Flatten()
        return (
            letters
            | "CountReasons" >> beam.Map(_count_reason)
            | "ToJson" >> beam.Map(lambda d: json.dumps(d.to_json_dict(), ensure_ascii=False, sort_keys=True))
            | "WriteJsonLines" >> beam.io.WriteToText(self.file_prefix, file_name_suffix=".jsonl")
        )


def _count_reason(letter: rows.DeadLetter) -> rows.DeadLetter:
    Metrics.counter(NAMESPACE, f"dead_letter_{letter.reason}").inc()
    return letter


class CountIds(beam.PTransform):
    """Transformed training batches -> one JSON object {table: {row id: count}} written to `path`.

    `columns` maps each table to the transformed column holding its ids (one or several a row).
    """

    def __init__(self, columns: dict[str, str], path: str):
        super().__init__()
        self.columns = columns
        self.path = path

    def expand(self, transformed):
        return (
            transformed
            | "CountPerBatch" >> beam.Map(_count_ids, columns=self.columns)
            | "Merge" >> beam.CombineGlobally(_merge_counts)
            | "ToJson" >> beam.Map(json.dumps, sort_keys=True)
            | "Write" >> beam.io.WriteToText(self.path, shard_name_template="", num_shards=1)
        )


def _count_ids(element, columns: dict[str, str]) -> dict:
    batch, _ = element
    counts = {}
    for table, column in columns.items():
        ids = batch.column(column).flatten().to_numpy(zero_copy_only=False)
        values, n = np.unique(ids, return_counts=True)
        counts[table] = {str(int(v)): int(c) for v, c in zip(values, n)}
    return counts


def _merge_counts(parts) -> dict:
    merged: dict[str, dict[str, int]] = {}
    for part in parts:
        for name, counts in part.items():
            table = merged.setdefault(name, {})
            for key, c in counts.items():
                table[key] = table.get(key, 0) + c
    return merged

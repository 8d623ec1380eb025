"""The named PTransforms the preprocessing jobs are composed of.

    ReadRawLogs | ParseAndValidate | SplitTrainEval | TransformAndWrite     (+ WriteDeadLetters)

`TransformAndWrite` runs tf.Transform (analyze on train, apply to both splits) and writes the
examples (`WriteExamples`), the transform graph and `CountIds` (how often each table row occurs
in the transformed training data, the `frequency` of the exports); `WriteDeadLetters` writes
every rejected row with its reason, file and line. The row-level logic itself is in
`pipeline.rows`, the readers in `pipeline.sources`, the example writer in `pipeline.sinks` and the
dead letters' line numbers in `pipeline.dead_letters`; these composites add batching, Beam's
exception handling (an unexpected error costs one row, never the job), tagging and counters.
"""

from __future__ import annotations

import json
import logging
import traceback

import apache_beam as beam
import numpy as np
import pyarrow as pa
import tensorflow_transform.beam as tft_beam
from apache_beam.metrics import Metrics
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.public import tfxio
from tfx_bsl.tfxio import tensor_representation_util

from pipeline import rows
from pipeline.dead_letters import AddLineNumbers
from pipeline.sinks import ExampleBatchSink
from pipeline.sources import CsvLineBatches, ParquetRowGroups, parquet_raw_rows
from schemas import layout
from schemas.config import Config, DatasetConfig
from schemas.layout import EVAL, TRAIN
from schemas.progress import Progress

NAMESPACE = "embedpipe"
DEAD = "dead"
COUNTS = "counts"  # the tag of (name, count) pairs for `WriteRowCounts`
_LOG = logging.getLogger(__name__)
# Shards per split of the examples, so that the trainer (and any reader) reads in parallel.
EXAMPLE_SHARDS = 8

__all__ = [
    "COUNTS",
    "DEAD",
    "EVAL",
    "NAMESPACE",
    "TRAIN",
    "CountIds",
    "ParseAndValidate",
    "ReadRawLogs",
    "SplitTrainEval",
    "TransformAndWrite",
    "WriteDeadLetters",
    "WriteExamples",
    "WriteRowCounts",
    "input_counts",
    "rows_counted",
    "tensor_adapter_config",
]


class ReadRawLogs(beam.PTransform):
    """Reads the configured input into `rows.RawRows` batches, each row with its file and line.

    CSV is read in blocks of lines (splittable across workers, see `pipeline.sources.CsvLineBatches`),
    Parquet row group by row group (`ParquetRowGroups`); nothing is parsed here, so that every per-row step
    runs inside `ParseAndValidate`'s exception handling. Returns a `DoOutputsTuple` with the main
    output `rows` and `DEAD` (rows the reader itself rejects: none at present).

        batches = pipeline | ReadRawLogs(config)
        batches.rows, batches[DEAD]
    """

    def __init__(self, config: DatasetConfig):
        super().__init__()
        self.config = config

    def expand(self, pbegin):
        inp = self.config.input
        if inp.format == "csv":
            return (
                pbegin
                | "ReadLines" >> beam.io.Read(CsvLineBatches(inp.path, 1 if inp.header else 0))
                | "CountRows" >> beam.ParDo(_CountRows()).with_outputs(DEAD, main="rows")
            )
        return (
            pbegin
            | "ReadParquet" >> beam.io.Read(ParquetRowGroups(inp.path, self.config.raw_columns))
            | "BatchRows" >> beam.FlatMap(parquet_raw_rows)
            | "CountRows" >> beam.ParDo(_CountRows()).with_outputs(DEAD, main="rows")
        )


class _CountRows(beam.DoFn):
    """Counts `RawRows` as read (`rows_read`) and logs progress; passes them on."""

    def __init__(self):
        self.rows_read = Metrics.counter(NAMESPACE, "rows_read")

    def setup(self):
        self._progress = Progress(_LOG, "preprocess: read (this worker)", unit="rows")

    def process(self, raw: rows.RawRows):
        self.rows_read.inc(len(raw))
        self._progress.add(len(raw))
        yield raw


class ParseAndValidate(beam.PTransform):
    """`RawRows` -> canonical RecordBatches (main output `rows`) and dead letters (`DEAD`).

    Known defects get their reason in `rows.parse_and_validate`. Anything else a batch raises
    is caught: the batch is retried one row at a time, and a row that still raises becomes an
    `unexpected_error` dead letter (its detail: the exception and the frame that raised), so a
    surprise costs that row, never the job, and is still counted. One ParDo with two outputs:
    the good batches never pass a Flatten (which the local runner would hold in memory whole).

        validated = batches.rows | ParseAndValidate(config)
        validated.rows, validated[DEAD]
    """

    def __init__(self, config: DatasetConfig):
        super().__init__()
        self.config = config

    def expand(self, batches):
        return batches | "Validate" >> beam.ParDo(_ParseAndValidate(self.config)).with_outputs(DEAD, main="rows")


class _ParseAndValidate(beam.DoFn):
    """One `RawRows` -> its canonical batch (main output) and its dead letters (`DEAD`)."""

    def __init__(self, config: DatasetConfig):
        self.config = config
        self.rows_valid = Metrics.counter(NAMESPACE, "rows_valid")

    def process(self, raw: rows.RawRows):
        try:
            parts = [rows.parse_and_validate(raw, self.config)]
        except Exception:  # a bug, not a bad row: find the row(s) it is about, keep the others
            parts = [self._one(single) for single in raw.one_by_one()] if len(raw) > 1 else [self._one(raw)]
        for good, dead in parts:
            for letter in dead:
                yield beam.pvalue.TaggedOutput(DEAD, letter)
            if good is not None and good.num_rows:
                self.rows_valid.inc(good.num_rows)
                yield good

    def _one(self, raw: rows.RawRows) -> tuple[pa.RecordBatch | None, list[rows.DeadLetter]]:
        try:
            return rows.parse_and_validate(raw, self.config)
        except Exception as e:  # still raises on its own: this row is the one, as unexpected_error
            return None, rows.unexpected_error(raw, _describe(e))


def _describe(error: Exception) -> str:
    """`RuntimeError('boom') (File "rows.py", line 12, in _validate)`: the error and where it was raised."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f' (File "{frames[-1].filename}", line {frames[-1].lineno}, in {frames[-1].name})' if frames else ""
    return f"{error!r}{where}"


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
    """{TRAIN: batches, EVAL: batches} -> tf.Transform outputs written into the run `output_dir`.

    Analyzes the training split only, applies the transform to both, and writes the transform
    graph (WriteTransformFn), both splits' examples and the id counts, where `schemas.layout`
    puts them (`transform_dir`, `examples_prefix`, `id_counts_path`).

    Args:
        preprocessing_fn: the tf.Transform function (`pipeline.preprocessing`, `pipeline.collaborative`).
        adapter: how the input RecordBatches become tensors (`tensor_adapter_config`).
        output_dir: the run directory.
        count_ids: counts the table rows of one transformed batch, for `CountIds`.
    """

    def __init__(self, preprocessing_fn, adapter: tfxio.TensorAdapterConfig, output_dir: str, count_ids):
        super().__init__()
        self.preprocessing_fn = preprocessing_fn
        self.adapter = adapter
        self.output_dir = output_dir
        self.count_ids = count_ids

    def expand(self, splits):
        (train, _), transform_fn = (
            splits[TRAIN],
            self.adapter,
        ) | "AnalyzeAndTransform" >> tft_beam.AnalyzeAndTransformDataset(
            self.preprocessing_fn, output_record_batches=True
        )
        eval_, _ = ((splits[EVAL], self.adapter), transform_fn) | "TransformEval" >> tft_beam.TransformDataset(
            output_record_batches=True
        )
        out = self.output_dir
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(layout.transform_dir(out))
        _ = train | "WriteTrain" >> WriteExamples(layout.examples_prefix(out, TRAIN))
        _ = eval_ | "WriteEval" >> WriteExamples(layout.examples_prefix(out, EVAL))
        return train | "CountIds" >> CountIds(self.count_ids, layout.id_counts_path(out))


class WriteExamples(beam.PTransform):
    """Transformed `(RecordBatch, passthrough)` pairs -> `num_shards` gzip TFRecord shards of tf.Examples.

    A batch stays one Beam element down to the file: `pipeline.sinks.ExampleBatchSink` encodes
    it with tfx_bsl's RecordBatch -> tf.Example encoder and writes its records with TensorFlow's
    TFRecord writer
    (C++ framing, CRCs and gzip). One element per example instead would cost Beam's per-element
    work (windowing, the sink's bookkeeping) a million times per million rows. The sink is a
    `FileBasedSink`, so shards are still written to temporary files and renamed into place only
    when the job commits (Beam's usual atomic finalisation).
    """

    def __init__(self, file_prefix: str, num_shards: int = EXAMPLE_SHARDS):
        super().__init__()
        self.file_prefix = file_prefix
        self.num_shards = num_shards

    def expand(self, transformed):
        return transformed | "WriteTFRecords" >> beam.io.Write(ExampleBatchSink(self.file_prefix, self.num_shards))


class WriteDeadLetters(beam.PTransform):
    """Dead letters (one PCollection or several) -> JSON lines (`reason`, `detail`, `source`,
    `line`, `offset`, `row`), counted per reason (`dead_letter_<reason>` counters)."""

    def __init__(self, file_prefix: str):
        super().__init__()
        self.file_prefix = file_prefix

    def expand(self, letters):
        if isinstance(letters, (tuple, list)):
            letters = letters | "Collect" >> beam.Flatten()
        return (
            letters
            | "AddLineNumbers" >> AddLineNumbers()
            | "CountReasons" >> beam.Map(_count_reason)
            | "ToJson" >> beam.Map(_to_json)
            | "WriteJsonLines" >> beam.io.WriteToText(self.file_prefix, file_name_suffix=".jsonl")
        )


def _to_json(letter: rows.DeadLetter) -> str:
    # default=str: a Parquet value JSON has no type for (a date, a decimal) is written as text.
    return json.dumps(letter.to_json_dict(), ensure_ascii=False, sort_keys=True, default=str)


def _count_reason(letter: rows.DeadLetter) -> rows.DeadLetter:
    Metrics.counter(NAMESPACE, f"dead_letter_{letter.reason}").inc()
    return letter


class WriteRowCounts(beam.PTransform):
    """(name, rows) pairs -> one JSON object {name: total} written to `path`: the job's own row
    counts (`schemas.layout.row_counts_path`), summed exactly once per element (Beam's counters
    are for watching a job; a Flex Template launch never sees them).

    Give it a tuple of PCollections of pairs, made with `beam.Map(rows_counted, name)`.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, pairs):
        return (
            pairs
            | "Flatten" >> beam.Flatten()
            | "Sum" >> beam.CombinePerKey(sum)
            | "ToDict" >> beam.combiners.ToDict()
            | "ToJson" >> beam.Map(json.dumps, sort_keys=True)
            | "Write" >> beam.io.WriteToText(self.path, shard_name_template="", num_shards=1)
        )


def input_counts(read, validated) -> tuple:
    """The (name, rows) pair PCollections every job writes with `WriteRowCounts`: rows read, and
    the dead letters of reading (`read[DEAD]`) and of validation (`validated[DEAD]`) by reason.
    Each job adds its own split counts to them."""
    return (
        read.rows | "CountRead" >> beam.Map(rows_counted, "read"),
        read[DEAD] | "CountUnread" >> beam.Map(rows_counted, "dead_letter"),
        validated[DEAD] | "CountInvalid" >> beam.Map(rows_counted, "dead_letter"),
    )


def rows_counted(element, name: str) -> tuple[str, int]:
    """(count name, rows) of one element: `RawRows` and RecordBatches by their rows; a dead
    letter is one row, counted as `dead_letter_<its reason>` (`name` is then `dead_letter`)."""
    if isinstance(element, rows.DeadLetter):
        return f"{name}_{element.reason}", 1
    return name, len(element) if isinstance(element, rows.RawRows) else element.num_rows


class CountIds(beam.PTransform):
    """Transformed training batches -> one JSON object {table: {row id: count}} written to `path`.

    `count_ids(batch)` counts one transformed RecordBatch: {table: (row ids, counts)} as int64
    arrays (for the supervised job `count_column_ids`: each table's ids are one column). The
    counts are merged as arrays, so a table of a million rows costs a few array operations.
    """

    def __init__(self, count_ids, path: str):
        super().__init__()
        self.count_ids = count_ids
        self.path = path

    def expand(self, transformed):
        return (
            transformed
            | "CountPerBatch" >> beam.Map(_count_batch, self.count_ids)
            | "Merge" >> beam.CombineGlobally(merge_counts)
            | "ToJson" >> beam.Map(counts_json)
            | "Write" >> beam.io.WriteToText(self.path, shard_name_template="", num_shards=1)
        )


IdCounts = dict[str, tuple[np.ndarray, np.ndarray]]


def _count_batch(element, count_ids) -> IdCounts:
    batch, _ = element
    return count_ids(batch)


def unique_counts(ids: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distinct ids, how often each occurs, or the sum of its `weights`), int64."""
    keys, inverse = np.unique(np.asarray(ids, np.int64), return_inverse=True)
    counts = np.bincount(inverse, weights=weights, minlength=len(keys))
    return keys, np.rint(counts).astype(np.int64)


def count_column_ids(batch: pa.RecordBatch, columns: dict[str, str]) -> IdCounts:
    """{table: (row ids, counts)} of one transformed batch; `columns` maps each table to the
    column holding its ids (one or several a row)."""
    return {
        table: unique_counts(batch.column(column).flatten().to_numpy(zero_copy_only=False))
        for table, column in columns.items()
    }


def merge_counts(parts) -> IdCounts:
    """The sum of several `IdCounts` (associative and commutative, as Beam's combine needs)."""
    merged: dict[str, list] = {}
    for part in parts:
        for table, (ids, counts) in part.items():
            merged.setdefault(table, []).append((ids, counts))
    out = {}
    for table, pieces in merged.items():
        ids = np.concatenate([p[0] for p in pieces])
        counts = np.concatenate([p[1] for p in pieces]).astype(np.float64)
        out[table] = unique_counts(ids, counts)
    return out


def counts_json(counts: IdCounts) -> str:
    """{table: {row id: count}} as the JSON of `id_counts.json` (ids as strings, sorted as text)."""
    return json.dumps(
        {table: {str(int(i)): int(c) for i, c in zip(ids, n) if c} for table, (ids, n) in counts.items()},
        sort_keys=True,
    )

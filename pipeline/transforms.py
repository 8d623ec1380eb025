"""The named PTransforms the preprocessing jobs are composed of.

    ReadRawLogs | ParseAndValidate | SplitTrainEval | TransformAndWrite

`TransformAndWrite` runs tf.Transform (analyze on train, apply to both splits) and writes the
examples (`WriteExamples`), the transform graph and `CountIds` (how often each table row occurs
in the transformed training data, the `frequency` of the exports); `WriteDeadLetters` writes
every rejected row with its reason, file and line. The row-level logic itself is in
`pipeline.rows`; these wrappers add reading with positions, batching, Beam's exception handling
(an unexpected error costs one row, never the job), tagging and counters.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import logging
import os
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf
import tensorflow_transform.beam as tft_beam
from apache_beam.io import filebasedsink, filebasedsource
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.public import tfxio
from tfx_bsl.tfxio import tensor_representation_util

from pipeline import rows
from schemas.config import Config, DatasetConfig

NAMESPACE = "embedpipe"
DEAD = "dead"
TRAIN = "train"
EVAL = "eval"
CSV_BATCH_LINES = 8192
CSV_READ_BLOCK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 65536
LINE_INDEX_BLOCK_BYTES = 16 << 20
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
    """Reads the configured input into `rows.RawRows` batches, each row with its file and line.

    CSV is read in blocks of lines (splittable across workers, see `_CsvLineBatches`), Parquet
    row group by row group (`_ParquetRowGroups`); nothing is parsed here, so that every per-row step
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
                | "ReadLines" >> beam.io.Read(_CsvLineBatches(inp.path, 1 if inp.header else 0))
                | "CountRows" >> beam.ParDo(_CountRows()).with_outputs(DEAD, main="rows")
            )
        return (
            pbegin
            | "ReadParquet" >> beam.io.Read(_ParquetRowGroups(inp.path, self.config.raw_columns))
            | "BatchRows" >> beam.FlatMap(_parquet_raw_rows)
            | "CountRows" >> beam.ParDo(_CountRows()).with_outputs(DEAD, main="rows")
        )


class _CsvLineBatches(filebasedsource.FileBasedSource):
    """CSV files -> `rows.RawRows` of up to CSV_BATCH_LINES lines, each line with its offset and line.

    Reads CSV_READ_BLOCK_BYTES at a time and cuts the block at line feeds with `bytes.split`,
    so no Python code runs per line. Lines are what Beam's `ReadFromText` yields: they end at a
    line feed, a carriage return just before it is dropped (CRLF files), a last line without
    one is kept, and a line belongs to the piece of the file in which its first byte lies (a
    piece that does not start the file begins after the first line feed at or after its start
    - 1), so the file splits across workers; compressed files are read whole.

    `offset` is the byte offset at which a line starts. `line` is its 1-based line number where
    the piece being read starts the file (the header is line 1), else None: a reader that starts
    mid-file cannot know how many lines precede it without reading them, and `WriteDeadLetters`
    fills those in for the rows it writes (`AddLineNumbers`). Checked against the file in
    tests/test_dead_letters.py.
    """

    def __init__(self, file_pattern: str, skip_header_lines: int, block_bytes: int = CSV_READ_BLOCK_BYTES):
        if skip_header_lines not in (0, 1):
            # A piece starting inside a longer header would not know to skip its later lines.
            raise ValueError(f"skip_header_lines must be 0 or 1, got {skip_header_lines}")
        super().__init__(file_pattern)  # compression: AUTO, from the file name
        self._skip_header_lines = skip_header_lines
        self._block_bytes = block_bytes

    def read_records(self, file_name, range_tracker):
        start = range_tracker.start_position() or 0
        with self.open_file(file_name) as f:
            if start:
                f.seek(start - 1)
                position, line = start - 1 + len(f.readline()), None
            else:
                position, line = 0, 1
                for _ in range(self._skip_header_lines):
                    skipped = f.readline()
                    position += len(skipped)
                    line += 1
            pending, started = b"", False
            while True:
                block = f.read(self._block_bytes)
                data = pending + block
                if block:
                    pieces = data.split(b"\n")
                    pending = pieces.pop()  # the start of a line the next block goes on with
                else:
                    pieces = [pending] if pending else []  # a last line without a line feed: as it is
                offsets = list(itertools.accumulate((len(p) + 1 for p in pieces), initial=position))
                position = offsets.pop()
                if block and b"\r" in data:
                    pieces = [p[:-1] if p.endswith(b"\r") else p for p in pieces]
                for i in range(0, len(pieces), CSV_BATCH_LINES):
                    batch = self._claim(range_tracker, offsets[i : i + CSV_BATCH_LINES], started)
                    if batch:
                        started = True
                        lines = [None] * len(batch) if line is None else range(line + i, line + i + len(batch))
                        yield rows.RawRows(file_name, pieces[i : i + len(batch)], lines, batch)
                    if len(batch) < len(offsets[i : i + CSV_BATCH_LINES]):
                        return  # the rest of the file is another piece's
                if not block:
                    return
                if line is not None:
                    line += len(pieces)

    @staticmethod
    def _claim(range_tracker, offsets: list[int], started: bool) -> list[int]:
        """The leading `offsets` that are this piece's: those before the range's stop, claimed
        by claiming the last of them (`started`: an earlier claim of this piece succeeded).

        A failed claim means the piece was split meanwhile, never at or below a position
        already claimed, so the offsets before the new stop are still this piece's. They are
        then marked as read (`set_current_position`) so that no later split can fall among
        them, and the stop is read once more for a split that came in between. Before any
        successful claim the tracker refuses every split, so there is nothing to mark.
        """
        n = bisect.bisect_left(offsets, range_tracker.stop_position())
        if n and not range_tracker.try_claim(offsets[n - 1]):
            n = bisect.bisect_left(offsets, range_tracker.stop_position())
            if n and started:
                range_tracker.set_current_position(offsets[n - 1])
                n = bisect.bisect_left(offsets, range_tracker.stop_position())
        return offsets[:n]

    def output_type_hint(self):
        return Any


class _CountRows(beam.DoFn):
    """Counts `RawRows` as read (`rows_read`) and logs progress; passes them on."""

    def __init__(self):
        self.rows_read = Metrics.counter(NAMESPACE, "rows_read")

    def setup(self):
        self._progress = _ReadProgress()

    def process(self, raw: rows.RawRows):
        self.rows_read.inc(len(raw))
        self._progress.add(len(raw), raw.source)
        yield raw


class _ParquetRowGroups(filebasedsource.FileBasedSource):
    """Parquet files -> `(file, row number of the first row, Table)` per row group.

    Splits like Beam's own Parquet source: a row group belongs to the piece of the file in which
    its first page starts. The row numbers come from the file's footer.
    """

    def __init__(self, file_pattern: str, columns: list[str]):
        super().__init__(file_pattern, compression_type=CompressionTypes.UNCOMPRESSED)
        self._columns = columns

    def read_records(self, file_name, range_tracker):
        with self.open_file(file_name) as f:
            parquet = pq.ParquetFile(f)
            meta = parquet.metadata
            first_row = 1
            start = range_tracker.start_position() or 0
            for i in range(meta.num_row_groups):
                group = meta.row_group(i)
                column = group.column(0)
                position = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
                if position >= start:
                    if not range_tracker.try_claim(position):
                        return
                    yield file_name, first_row, parquet.read_row_group(i, columns=self._columns)
                first_row += group.num_rows

    def output_type_hint(self):
        return Any


def _parquet_raw_rows(element):
    """`(file, first row, Table)` -> `RawRows` of at most PARQUET_BATCH_ROWS rows."""
    source, first_row, table = element
    for batch in table.to_batches(max_chunksize=PARQUET_BATCH_ROWS):
        if batch.num_rows:
            yield rows.RawRows(source, batch, range(first_row, first_row + batch.num_rows))
            first_row += batch.num_rows


class ParseAndValidate(beam.PTransform):
    """`RawRows` -> canonical RecordBatches (main output `rows`) and dead letters (`DEAD`).

    Known defects get their reason in `rows.parse_and_validate`. Anything else a batch raises
    is caught by Beam's exception handling (`with_exception_handling`): the batch is retried one
    row at a time, and a row that still raises becomes an `unexpected_error` dead letter, so a
    surprise costs that row, never the job, and is still counted.

        validated = batches.rows | ParseAndValidate(config)
        validated.rows, validated[DEAD]
    """

    def __init__(self, config: DatasetConfig):
        super().__init__()
        self.config = config

    def expand(self, batches):
        fn = _ParseAndValidate(self.config)
        first = batches | "Validate" >> beam.ParDo(fn).with_exception_handling(main_tag="out", dead_letter_tag="failed")
        retried = (
            first["failed"]
            | "OneRowEach" >> beam.FlatMap(lambda failed: failed[0].one_by_one())
            | "ValidateOneByOne" >> beam.ParDo(fn).with_exception_handling(main_tag="out", dead_letter_tag="failed")
        )
        unexpected = retried["failed"] | "UnexpectedErrors" >> beam.FlatMap(_unexpected_error)
        return (
            (first["out"], retried["out"], unexpected)
            | "Merge" >> beam.Flatten()
            | "Route" >> beam.ParDo(_Route()).with_outputs(DEAD, main="rows")
        )


class _ParseAndValidate(beam.DoFn):
    """One `RawRows` -> its canonical batch and its dead letters, on one output (all or nothing)."""

    def __init__(self, config: DatasetConfig):
        self.config = config

    def process(self, raw: rows.RawRows):
        good, dead = rows.parse_and_validate(raw, self.config)
        yield from dead
        if good.num_rows:
            yield good


def _unexpected_error(failed) -> list[rows.DeadLetter]:
    """Beam's dead-letter element `(input, (type, repr, traceback lines))` -> DeadLetters."""
    raw, (_, error, trace) = failed
    frames = [t.strip().splitlines()[0] for t in trace if t.startswith("  File ")]
    return rows.unexpected_error(raw, f"{error} ({frames[-1]})" if frames else error)


class _Route(beam.DoFn):
    def __init__(self):
        self.rows_valid = Metrics.counter(NAMESPACE, "rows_valid")

    def process(self, element):
        if isinstance(element, rows.DeadLetter):
            yield beam.pvalue.TaggedOutput(DEAD, element)
        else:
            self.rows_valid.inc(element.num_rows)
            yield element


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
    """Transformed `(RecordBatch, passthrough)` pairs -> gzip TFRecord shards of tf.Examples.

    A batch stays one Beam element down to the file: `_ExampleBatchSink` encodes it with tfx_bsl's
    RecordBatch -> tf.Example encoder and writes its records with TensorFlow's TFRecord writer
    (C++ framing, CRCs and gzip). One element per example instead would cost Beam's per-element
    work (windowing, the sink's bookkeeping) a million times per million rows. The sink is a
    `FileBasedSink`, so shards are still written to temporary files and renamed into place only
    when the job commits (Beam's usual atomic finalisation).
    """

    def __init__(self, file_prefix: str):
        super().__init__()
        self.file_prefix = file_prefix

    def expand(self, transformed):
        return transformed | "WriteTFRecords" >> beam.io.Write(_ExampleBatchSink(self.file_prefix))


class _ExampleBatchSink(filebasedsink.FileBasedSink):
    """A FileBasedSink whose records are whole `(RecordBatch, passthrough)` pairs; each shard is a
    gzip TFRecord file written by `tf.io.TFRecordWriter`, so on any path TensorFlow can write
    (local, gs://; the trainer reads the same paths with tf.data). Beam's shard limits
    (max_records_per_shard, max_bytes_per_shard) are not offered: they would count batches,
    and Beam's byte counter wraps its own file handles."""

    def __init__(self, file_prefix: str):
        super().__init__(
            file_prefix,
            coder=beam.coders.BytesCoder(),  # unused: write_record encodes whole batches itself
            file_name_suffix=".tfrecord.gz",
            mime_type="application/octet-stream",
            compression_type=CompressionTypes.UNCOMPRESSED,  # the TFRecord writer compresses
        )

    def open(self, temp_path):
        return tf.io.TFRecordWriter(temp_path, tf.io.TFRecordOptions(compression_type="GZIP"))

    def write_record(self, writer, element):
        batch, _ = element
        for record in tfxio.RecordBatchToExamplesEncoder().encode(batch):
            writer.write(record)

    def close(self, writer):
        writer.close()


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


class AddLineNumbers(beam.PTransform):
    """Fills in `line` for CSV dead letters that only know their byte `offset`.

    Those are rows read by a worker that started mid-file (`_CsvLineBatches`). Their line is
    1 + the newlines before the offset: each file is cut into blocks of `block_size` bytes,
    every block before the last one holding such a row has its newlines counted (in parallel),
    and each block holding such rows is read once more up to its last one. This reads only
    files with such rows, at most once more each, and nothing when there are none. A file that
    cannot be read again (moved, compressed) leaves `line` empty; the offset stays exact.
    """

    def __init__(self, block_size: int = LINE_INDEX_BLOCK_BYTES):
        super().__init__()
        self.block_size = block_size

    def expand(self, letters):
        size = self.block_size
        known, unknown = letters | "NeedsLine" >> beam.Partition(
            lambda d, _: int(d.line is None and d.offset is not None and _seekable(d.source)), 2
        )
        by_block = unknown | "ByBlock" >> beam.Map(lambda d: ((d.source, d.offset // size), d))
        newlines_before = (
            by_block
            | "Blocks" >> beam.Keys()
            | "LastBlockPerFile" >> beam.CombinePerKey(max)
            | "BlocksBefore" >> beam.FlatMap(lambda fk: [(fk[0], k) for k in range(fk[1])])
            | "Spread" >> beam.Reshuffle()
            | "CountNewlines" >> beam.Map(lambda fk: (fk[0], (fk[1], _count_newlines(fk[0], fk[1] * size, size))))
            | "PerFile" >> beam.GroupByKey()
            | "PrefixSums" >> beam.MapTuple(lambda source, counts: (source, _prefix_sums(counts)))
        )
        found = (
            by_block
            | "GroupByBlock" >> beam.GroupByKey()
            | "Resolve" >> beam.FlatMap(_resolve_lines, size, beam.pvalue.AsDict(newlines_before))
        )
        return (known, found) | "All" >> beam.Flatten()


def _seekable(source: str) -> bool:
    return CompressionTypes.detect_compression_type(source) == CompressionTypes.UNCOMPRESSED


def _read_range(source: str, start: int, length: int) -> bytes | None:
    """`length` bytes of `source` from `start`, None (with a warning) if it cannot be read again."""
    try:
        with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.seek(start)
            return f.read(length)
    except OSError as e:
        _LOG.warning("dead letters of %s keep no line number: %s", source, e)
        return None


def _count_newlines(source: str, start: int, length: int) -> int | None:
    data = _read_range(source, start, length)
    return None if data is None else data.count(b"\n")


def _prefix_sums(counts) -> list[int | None]:
    """[(block, newlines)] -> newlines before each block (None from a block that could not be read on)."""
    per_block = dict(counts)
    sums, total = [0], 0
    for k in range(len(per_block)):
        n = per_block.get(k)
        total = None if total is None or n is None else total + n
        sums.append(total)
    return sums


def _resolve_lines(element, size: int, newlines_before: dict):
    (source, block), letters = element
    letters = sorted(letters, key=lambda d: d.offset)
    sums = newlines_before.get(source, [0])
    before = sums[block] if block < len(sums) else None
    start = block * size
    data = None if before is None else _read_range(source, start, letters[-1].offset - start)
    if data is None:
        yield from letters
        return
    line, position = 1 + before, 0
    for letter in letters:
        line += data.count(b"\n", position, letter.offset - start)
        position = letter.offset - start
        yield dataclasses.replace(letter, line=line)


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

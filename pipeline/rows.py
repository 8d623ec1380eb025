"""Row-level work on Arrow RecordBatches: CSV parsing, validation, the train/eval split.

Everything here is a pure function of a batch (no Beam), vectorised with pyarrow compute, and
returns the rows it rejects as dead letters instead of dropping them. The Beam wrappers live in
`pipeline.transforms`.

The *canonical* batch that leaves `validate_batch` has one column per configured input column,
each a `large_list` holding exactly one value (int64, float32 or large_binary): the layout the
TFXIO tensor adapter turns into dense tensors for tf.Transform.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import tensorflow as tf

from schemas.config import Config

ARROW_TYPES = {"int": pa.int64(), "float": pa.float32(), "string": pa.large_binary()}

_INT_PATTERN = r"^\s*[-+]?\d{1,18}(\.0*)?\s*$"
_FLOAT_PATTERN = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"

# Dead-letter reasons (also the names of the Beam counters that count them).
EMPTY_LINE = "empty_line"
INVALID_UTF8 = "invalid_utf8"
MALFORMED_CSV = "malformed_csv"
MISSING_VALUE = "missing_value"
BAD_INT = "bad_int"
BAD_FLOAT = "bad_float"


class InputError(ValueError):
    """Input data that cannot be read at all (as opposed to single bad rows)."""


@dataclass(frozen=True)
class DeadLetter:
    """A rejected input row: why, where it came from, and the row as read."""

    reason: str
    detail: str
    source: str
    row: str | dict

    def to_json_dict(self) -> dict:
        return {"reason": self.reason, "detail": self.detail, "source": self.source, "row": self.row}


def canonical_schema(config: Config) -> pa.Schema:
    return pa.schema([(c, pa.large_list(ARROW_TYPES[t])) for c, t in config.input.columns.items()])


# ----------------------------------------------------------------------------------------------
# CSV


def parse_csv_lines(lines: list[bytes], config: Config, source: str) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """Parse CSV lines (no header) into a batch of nullable string columns.

    Lines that are empty, not UTF-8, hold a carriage return or an unbalanced quote (a quoted
    field cannot span lines here), or do not have the configured number of fields become dead
    letters; every other line is exactly one row of the result, in order.
    """
    dead: list[DeadLetter] = []
    kept = []
    for line in lines:
        if not line.strip():
            dead.append(DeadLetter(EMPTY_LINE, "empty line", source, line.decode("utf-8", "replace")))
        elif b"\r" in line:
            # The parser would end a row there; Beam's line reader only splits on LF.
            dead.append(DeadLetter(MALFORMED_CSV, "carriage return inside a line", source, _text(line)))
        elif line.count(b'"') % 2:
            # An unbalanced quote would make the parser swallow the following lines into one row.
            dead.append(DeadLetter(MALFORMED_CSV, "unbalanced quote", source, _text(line)))
        else:
            kept.append(line)
    try:
        pa.array(kept, pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:
        good = []
        for line in kept:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                dead.append(DeadLetter(INVALID_UTF8, str(e), source, _text(line)))
            else:
                good.append(line)
        kept = good
    if not kept:
        return _empty_strings(config.raw_columns), dead
    try:
        batch, rejected = _read_csv_block(kept, config, source)
    except pa.ArrowInvalid:
        batch = None  # a parse error that is not a field-count mismatch: find the lines one by one
    if batch is not None and batch.num_rows + len(rejected) == len(kept):
        return batch, dead + rejected
    batches = []
    for line in kept:
        try:
            batch, rejected = _read_csv_block([line], config, source)
        except pa.ArrowInvalid as e:
            dead.append(DeadLetter(MALFORMED_CSV, str(e).strip(), source, _text(line)))
            continue
        if batch.num_rows + len(rejected) == 1:
            batches.append(batch)
            dead.extend(rejected)
        else:
            dead.append(DeadLetter(MALFORMED_CSV, f"parses as {batch.num_rows} rows", source, _text(line)))
    table = pa.Table.from_batches(batches, schema=_empty_strings(config.raw_columns).schema).combine_chunks()
    return (table.to_batches()[0] if table.num_rows else _empty_strings(config.raw_columns)), dead


def check_csv_header(first_line: bytes, config: Config, source: str) -> None:
    """Raises InputError unless a CSV file's header names the configured columns, in order."""
    text = first_line.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n")
    found = next(csv.reader([text], delimiter=config.input.delimiter), [])
    if found != config.raw_columns:
        raise InputError(
            f"{source}: header {found} does not match input.columns of {config.source} "
            f"{config.raw_columns} (columns are read by position; set header: false for files without one)"
        )


def _read_csv_block(lines: list[bytes], config: Config, source: str) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """One pyarrow parse of `lines`; rows with the wrong field count come back as dead letters."""
    names = config.raw_columns
    rejected: list[DeadLetter] = []

    def on_invalid_row(row) -> str:
        detail = f"expected {row.expected_columns} fields, got {row.actual_columns}"
        rejected.append(DeadLetter(MALFORMED_CSV, detail, source, row.text))
        return "skip"

    data = b"\n".join(lines) + b"\n"
    table = pacsv.read_csv(
        io.BytesIO(data),
        # One block for the whole batch, so that no line straddles a block boundary.
        read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=max(1 << 20, len(data) + 1)),
        parse_options=pacsv.ParseOptions(
            delimiter=config.input.delimiter, invalid_row_handler=on_invalid_row, ignore_empty_lines=False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in names},
            null_values=list(config.input.null_values),
            strings_can_be_null=True,
        ),
    )
    batches = table.combine_chunks().to_batches()
    return (batches[0] if batches else _empty_strings(names)), rejected


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace")


def _empty_strings(names: list[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], pa.string()) for _ in names], names=names)


# ----------------------------------------------------------------------------------------------
# Validation


def validate_batch(batch: pa.RecordBatch, config: Config, source: str) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """Type, null-check and fill one batch; returns (canonical batch of good rows, dead letters).

    `batch` holds the configured columns either as strings (from CSV) or already typed (from
    Parquet). A row is rejected for the first column, in config order, that is missing without a
    default, or that does not parse as its declared type.
    """
    missing = [c for c in config.raw_columns if c not in batch.schema.names]
    if missing:
        raise InputError(f"{source}: columns {missing} declared in {config.source} are not in the data")
    n = batch.num_rows
    reasons = np.full(n, "", dtype=object)
    details = np.full(n, "", dtype=object)
    values = {}
    for col, kind in config.input.columns.items():
        arr, bad = _convert(batch.column(col), kind)
        if bad.any():
            _mark(reasons, details, bad, BAD_INT if kind == "int" else BAD_FLOAT, col, f"not a valid {kind}")
        if col in config.input.defaults:
            arr = pc.fill_null(arr, pa.scalar(config.input.defaults[col]).cast(arr.type))
        null = arr.is_null().to_numpy(zero_copy_only=False) & ~bad
        if null.any():
            _mark(reasons, details, null, MISSING_VALUE, col, "missing value")
        values[col] = arr
    rejected = reasons != ""
    dead = []
    if rejected.any():
        raw = batch.filter(pa.array(rejected)).to_pylist()
        for row, reason, detail in zip(raw, reasons[rejected], details[rejected]):
            dead.append(DeadLetter(reason, detail, source, {k: _jsonable(v) for k, v in row.items()}))
    keep = pa.array(~rejected)
    columns = [_one_value_lists(values[col].filter(keep)) for col in config.input.columns]
    return pa.RecordBatch.from_arrays(columns, schema=canonical_schema(config)), dead


def _convert(arr: pa.Array, kind: str) -> tuple[pa.Array, np.ndarray]:
    """A column as its declared type: (array with nulls where missing or bad, mask of bad values).

    Text (CSV) is checked against a pattern first, so a bad value rejects its row, not the batch;
    typed (Parquet) values are checked for what the cast would lose. Ints are at most 18 digits
    (whole numbers written as `16.0` are fine); NaN counts as missing; infinities are bad.
    """
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_floating(arr.type):
        arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
    is_text = pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
    if kind == "string":
        return pc.cast(arr if is_text else pc.cast(arr, pa.string()), pa.large_binary()), np.zeros(len(arr), bool)
    if is_text:
        ok = pc.fill_null(pc.match_substring_regex(arr, _INT_PATTERN if kind == "int" else _FLOAT_PATTERN), True)
        arr = pc.utf8_trim_whitespace(pc.if_else(ok, arr, pa.scalar(None, arr.type)))
        if kind == "int":
            arr = pc.replace_substring_regex(arr, r"\.0*$", "")
        arr = pc.cast(arr, ARROW_TYPES[kind])
    elif kind == "int" and pa.types.is_floating(arr.type):
        whole = pc.and_(pc.equal(pc.floor(arr), arr), pc.less_equal(pc.abs(arr), 2.0**53))
        ok = pc.fill_null(whole, True)
        arr = pc.cast(pc.if_else(ok, arr, pa.scalar(None, arr.type)), pa.int64(), safe=False)
    else:
        ok = pa.array(np.ones(len(arr), bool))
        arr = pc.cast(arr, ARROW_TYPES[kind])
    if kind == "float":
        ok = pc.and_(ok, pc.fill_null(pc.is_finite(arr), True))
        arr = pc.if_else(ok, arr, pa.scalar(None, arr.type))
    return arr, ~ok.to_numpy(zero_copy_only=False)


def _mark(reasons, details, mask, reason, col, what):
    fresh = mask & (reasons == "")
    reasons[fresh] = reason
    details[fresh] = f"{what} in column {col!r}"


def _one_value_lists(values: pa.Array) -> pa.Array:
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int64))
    return pa.LargeListArray.from_arrays(offsets, values)


def _jsonable(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


# ----------------------------------------------------------------------------------------------
# Split


def eval_mask(batch: pa.RecordBatch, config: Config) -> np.ndarray:
    """True for the rows of a canonical batch that belong to the eval split.

    The split hashes (FarmHash fingerprint, as tf.strings.to_hash_bucket_fast) the split key
    columns joined with the config's salt, so a row's split never depends on batching, worker
    count or run.
    """
    keys = config.split.key or tuple(config.raw_columns)
    parts = [pc.cast(pc.list_flatten(batch.column(k)), pa.string()) for k in keys]
    joined = pc.binary_join_element_wise(*parts, pa.scalar(config.split.salt), "\x1f")
    buckets = tf.strings.to_hash_bucket_fast(joined.to_numpy(zero_copy_only=False).astype(object), 100).numpy()
    return buckets < config.split.eval_percent

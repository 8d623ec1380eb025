"""Row-level work on Arrow RecordBatches: CSV parsing, validation, the train/eval split.

Everything here is a pure function of a batch (no Beam), vectorised with pyarrow compute, and
returns the rows it rejects as dead letters instead of dropping them. The Beam wrappers live in
`pipeline.transforms`.

A batch arrives as `RawRows`: CSV lines or a typed Parquet batch, with where each row came
from; `parse_and_validate` turns it into a *canonical* batch of good rows plus a `DeadLetter`
for every other row. The canonical batch has one column per configured input column, each a
`large_list` holding exactly one value (int64, float32 or large_binary): the layout the TFXIO
tensor adapter turns into dense tensors for tf.Transform.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import tensorflow as tf

from schemas.config import Config, DatasetConfig
from schemas.errors import InputError

ARROW_TYPES = {"int": pa.int64(), "float": pa.float32(), "string": pa.large_binary()}

_INT_PATTERN = r"^\s*[-+]?\d{1,18}(\.0*)?\s*$"
_FLOAT_PATTERN = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"
_BOM = b"\xef\xbb\xbf"
# An empty or whitespace-only line, in a batch joined with LF that holds no CR.
_BLANK_LINE = re.compile(rb"(?:^|\n)[ \t\x0b\x0c]*(?:\n|$)")

# Dead-letter reasons (also the names of the Beam counters that count them, `dead_letter_<reason>`).
EMPTY_LINE = "empty_line"  # an empty or whitespace-only CSV line
INVALID_UTF8 = "invalid_utf8"
MALFORMED_CSV = "malformed_csv"  # wrong field count, unbalanced quote, bare CR, NUL byte
REPEATED_HEADER = "repeated_header"  # a CSV line that is the header again (concatenated files)
OVERSIZED_FIELD = "oversized_field"  # a value longer than input.max_field_bytes
MISSING_VALUE = "missing_value"
BAD_INT = "bad_int"
BAD_FLOAT = "bad_float"
UNEXPECTED_ERROR = "unexpected_error"  # per-row code raised: a bug, caught so the row is kept
REASONS = (
    EMPTY_LINE,
    INVALID_UTF8,
    MALFORMED_CSV,
    REPEATED_HEADER,
    OVERSIZED_FIELD,
    MISSING_VALUE,
    BAD_INT,
    BAD_FLOAT,
    UNEXPECTED_ERROR,
)


# A rejected row of a batch: (its index in the batch, reason, detail).
Reject = tuple[int, str, str]


@dataclass(frozen=True)
class DeadLetter:
    """A rejected input row: why, where it came from, and the row as read.

    `row` is the raw line for CSV (invalid UTF-8 bytes written as `\\xff`) and the typed values
    for Parquet. `line` is the 1-based line of a CSV file (the header is line 1) or the 1-based
    row of a Parquet file, None where unknown; `offset` is the byte offset at which the CSV
    line starts in its file (uncompressed), None for Parquet.
    """

    reason: str
    detail: str
    source: str
    row: str | dict
    line: int | None = None
    offset: int | None = None

    def to_json_dict(self) -> dict:
        return {
            "reason": self.reason,
            "detail": self.detail,
            "source": self.source,
            "row": self.row,
            "line": self.line,
            "offset": self.offset,
        }


@dataclass(frozen=True)
class RawRows:
    """One batch of input rows as read, and where each came from.

    `data` is a list of CSV lines (no header, no line ending) or a typed RecordBatch (Parquet);
    `lines[i]` and `offsets[i]` locate row i as `DeadLetter.line` and `.offset` do.
    """

    source: str
    data: list[bytes] | pa.RecordBatch
    lines: Sequence[int | None]
    offsets: Sequence[int] | None = None

    def __len__(self) -> int:
        return len(self.data) if isinstance(self.data, list) else self.data.num_rows

    def one_by_one(self) -> list[RawRows]:
        """Each row as a batch of its own (to find the row a batch failed on)."""
        if isinstance(self.data, list):
            parts = [self.data[i : i + 1] for i in range(len(self))]
        else:
            parts = [self.data.slice(i, 1) for i in range(len(self))]
        return [
            RawRows(self.source, part, self.lines[i : i + 1], None if self.offsets is None else self.offsets[i : i + 1])
            for i, part in enumerate(parts)
        ]

    def dead_letters(self, rejects: list[Reject]) -> list[DeadLetter]:
        """DeadLetters for (row index, reason, detail) triples, in row order."""
        rejects = sorted(rejects)
        if isinstance(self.data, list):
            raw = [_text(self.data[i]) for i, _, _ in rejects]
        else:
            table = self.data.take(pa.array([i for i, _, _ in rejects], pa.int64()))
            raw = [{k: _jsonable(v) for k, v in row.items()} for row in table.to_pylist()]
        return [
            DeadLetter(reason, detail, self.source, row, self.lines[i], self.offsets[i] if self.offsets else None)
            for (i, reason, detail), row in zip(rejects, raw)
        ]


def canonical_schema(config: Config) -> pa.Schema:
    """The canonical batch's schema: each used input column (`used_columns`) a large_list of one
    int64, float32 or binary value."""
    return pa.schema([(c, pa.large_list(ARROW_TYPES[t])) for c, t in config.used_columns.items()])


def parse_and_validate(raw: RawRows, config: DatasetConfig) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """A batch as read -> (canonical batch of its good rows, a dead letter for every other row).

    Known defects get their reason; anything else that goes wrong raises (the Beam wrapper
    retries the batch row by row and dead-letters a row that still raises as
    `unexpected_error`, see `unexpected_error`).
    """
    if isinstance(raw.data, list):
        batch, kept, rejects = _parse_csv(raw.data, config)
    else:
        batch, kept, rejects = raw.data, None, []
    good, invalid = _validate(batch, config)
    rejects += [(i if kept is None else kept[i], reason, detail) for i, reason, detail in invalid]
    return good, raw.dead_letters(rejects)


def unexpected_error(raw: RawRows, error: str) -> list[DeadLetter]:
    """Every row of `raw` as an `unexpected_error` dead letter with `error` as its detail."""
    return raw.dead_letters([(i, UNEXPECTED_ERROR, error) for i in range(len(raw))])


def check_bad_fraction(read: int, dead: dict[str, int], config: DatasetConfig, dead_letter_path: str) -> None:
    """Raises InputError when more than `input.max_bad_fraction` of the rows read were rejected.

    `dead` counts the rejected rows per reason. The message is one line: the config field, the
    counts, the most common reasons and where the rejected rows are.
    """
    total = sum(dead.values())
    limit = config.input.max_bad_fraction
    if read and total > limit * read:
        top = sorted(dead.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        raise InputError(
            f"{config.source}: input.max_bad_fraction: {total} of {read} rows read ({total / read:.1%}) were "
            f"dead-lettered, more than the {limit:g} allowed (top reasons: {', '.join(f'{r} {n}' for r, n in top)}); "
            f"the rejected rows are in {dead_letter_path}"
        )


# ----------------------------------------------------------------------------------------------
# CSV


def parse_csv_lines(lines: list[bytes], config: Config, source: str) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """Parse CSV lines (no header) into a batch of nullable string columns.

    Lines that are empty or blank, not UTF-8, hold a NUL byte, a carriage return or an
    unbalanced quote (a quoted field cannot span lines here), repeat the header, or do not have
    the configured number of fields become dead letters; every other line is exactly one row of
    the result, in order. A leading byte order mark is dropped.
    """
    batch, _, rejects = _parse_csv(lines, config)
    return batch, RawRows(source, lines, [None] * len(lines)).dead_letters(rejects)


def _parse_csv(lines: list[bytes], config: DatasetConfig) -> tuple[pa.RecordBatch, list[int], list[Reject]]:
    """(batch of string columns, index in `lines` of each batch row, (index, reason, detail) rejects)."""
    header = config.input.delimiter.join(config.raw_columns).encode()
    rejects: list[Reject] = []
    kept: list[int] = []
    text: list[bytes] = []
    # Look for the rare bytes once in the whole batch, so that most lines pay for none of them.
    blob = b"\n".join(lines)
    cr, nul, quote, bom, again = (s in blob for s in (b"\r", b"\0", b'"', _BOM, header))
    if not (cr or nul or quote or bom or again or _BLANK_LINE.search(blob)):
        kept, text = list(range(len(lines))), list(lines)  # the usual batch: no line needs a look of its own
    else:
        for i, line in enumerate(lines):
            if cr and line.endswith(b"\r"):
                line = line[:-1]  # a CRLF line ending the reader did not take off (a last line)
            if bom and line.startswith(_BOM):
                line = line[len(_BOM) :]  # a file's byte order mark, or one left inside by concatenating files
            stripped = line.strip()
            if not stripped:
                rejects.append((i, EMPTY_LINE, "empty line" if not line else "whitespace-only line"))
            elif nul and b"\0" in line:
                rejects.append((i, MALFORMED_CSV, "NUL byte inside a line"))
            elif cr and b"\r" in line:
                # The parser would end a row there; the line reader (_CsvLineBatches) only splits on LF.
                rejects.append((i, MALFORMED_CSV, "carriage return inside a line"))
            elif quote and line.count(b'"') % 2:
                # An unbalanced quote would make the parser swallow the following lines into one row.
                rejects.append((i, MALFORMED_CSV, "unbalanced quote"))
            elif again and stripped == header:
                rejects.append((i, REPEATED_HEADER, "the header line again, inside the data"))
            else:
                kept.append(i)
                text.append(line)
    try:
        pa.array(text, pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:
        good = []
        for i, line in zip(kept, text):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                rejects.append((i, INVALID_UTF8, str(e)))
            else:
                good.append((i, line))
        kept, text = [i for i, _ in good], [line for _, line in good]
    if not kept:
        return _empty_strings(config.raw_columns), [], rejects
    try:
        batch, invalid = _read_csv_block(text, config)
    except pa.ArrowInvalid:
        batch = None  # a parse error that is not a field-count mismatch: find the lines one by one
    if batch is not None and batch.num_rows + len(invalid) == len(kept) and all(0 <= j < len(kept) for j, _ in invalid):
        bad = {j for j, _ in invalid}
        rejects += [(kept[j], MALFORMED_CSV, detail) for j, detail in invalid]
        return batch, [i for j, i in enumerate(kept) if j not in bad], rejects
    batches, rows_kept = [], []
    for i, line in zip(kept, text):
        try:
            batch, invalid = _read_csv_block([line], config)
        except pa.ArrowInvalid as e:
            rejects.append((i, MALFORMED_CSV, str(e).strip()))
            continue
        if invalid:
            rejects.append((i, MALFORMED_CSV, invalid[0][1]))
        elif batch.num_rows == 1:
            batches.append(batch)
            rows_kept.append(i)
        else:
            rejects.append((i, MALFORMED_CSV, f"parses as {batch.num_rows} rows"))
    table = pa.Table.from_batches(batches, schema=_empty_strings(config.raw_columns).schema).combine_chunks()
    return (table.to_batches()[0] if table.num_rows else _empty_strings(config.raw_columns)), rows_kept, rejects


def check_csv_header(first_line: bytes, config: DatasetConfig, source: str) -> None:
    """Raises InputError unless a CSV file's header names the configured columns, in order."""
    text = first_line.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n")
    found = next(csv.reader([text], delimiter=config.input.delimiter), [])
    if found != config.raw_columns:
        raise InputError(
            f"{source}: header {found} does not match input.columns of {config.source} "
            f"{config.raw_columns} (columns are read by position; set header: false for files without one)"
        )


def check_input_file(f, config: DatasetConfig, source: str) -> None:
    """Checks an open input file before the job: a CSV file's header (see `check_csv_header`),
    a Parquet file's columns (see `check_parquet_schema`)."""
    if config.input.format == "parquet":
        check_parquet_schema(pq.read_schema(f), config, source)
    elif config.input.header:
        check_csv_header(f.readline(), config, source)


def check_parquet_schema(schema: pa.Schema, config: DatasetConfig, source: str) -> None:
    """Raises InputError unless a Parquet file has every configured column, each used one a plain
    value (not a list, struct or map), so that a bad value can only ever reject its own row."""
    missing = [c for c in config.raw_columns if c not in schema.names]
    if missing:
        raise InputError(f"{source}: columns {missing} declared in {config.source} are not in the data")
    for col in config.used_columns:
        kind = schema.field(col).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if pa.types.is_nested(kind):
            raise InputError(
                f"{source}: column {col!r} is {kind}, not a single value; {config.source} declares it "
                f"{config.input.columns[col]}"
            )


def _read_csv_block(lines: list[bytes], config: DatasetConfig) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """One pyarrow parse of `lines`; rows with the wrong field count come back as (index, detail)."""
    names = config.raw_columns
    invalid: list[tuple[int, str]] = []

    def on_invalid_row(row) -> str:
        # `number` is the 1-based physical row, which is the line: no line holds a line break.
        invalid.append((row.number - 1, f"expected {row.expected_columns} fields, got {row.actual_columns}"))
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
    return (batches[0] if batches else _empty_strings(names)), invalid


def _text(line: bytes) -> str:
    return line.decode("utf-8", "backslashreplace")


def _empty_strings(names: list[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], pa.string()) for _ in names], names=names)


# ----------------------------------------------------------------------------------------------
# Validation


def validate_batch(batch: pa.RecordBatch, config: Config, source: str) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """Type, null-check and fill one batch; returns (canonical batch of good rows, dead letters).

    `batch` holds the configured columns either as strings (from CSV) or already typed (from
    Parquet). Only the used columns (`DatasetConfig.used_columns`) are looked at: a row is
    rejected for a value longer than `input.max_field_bytes`, else for the first used column,
    in config order, that is missing without a default or that does not parse as its declared
    type. The dead letters hold the row's values, every column's (`parse_and_validate` gives CSV
    rows their raw line instead).
    """
    good, rejects = _validate(batch, config)
    return good, RawRows(source, batch, [None] * batch.num_rows).dead_letters(rejects)


def _validate(batch: pa.RecordBatch, config: DatasetConfig) -> tuple[pa.RecordBatch, list[Reject]]:
    """(canonical batch of the good rows, rejects) for `validate_batch`. The columns were
    checked once before the job (`check_input_file`)."""
    n = batch.num_rows
    limit = config.input.max_field_bytes
    used = config.used_columns  # the other columns are never parsed: they cannot reject a row
    reasons = np.full(n, "", dtype=object)
    columns = np.full(n, "", dtype=object)
    for col in used:
        arr = batch.column(col)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if _is_text(arr.type):
            too_long = pc.fill_null(pc.greater(pc.binary_length(arr), limit), False)
            _mark(reasons, columns, too_long.to_numpy(zero_copy_only=False), OVERSIZED_FIELD, col)
    values = {}
    for col, kind in used.items():
        arr, bad = _convert(batch.column(col), kind)
        _mark(reasons, columns, bad, BAD_INT if kind == "int" else BAD_FLOAT, col)
        if col in config.input.defaults:
            arr = pc.fill_null(arr, pa.scalar(config.input.defaults[col]).cast(arr.type))
        _mark(reasons, columns, arr.is_null().to_numpy(zero_copy_only=False) & ~bad, MISSING_VALUE, col)
        values[col] = arr
    rejected = reasons != ""
    rejects = [
        (i, reasons[i], _detail(batch, i, reasons[i], columns[i], limit)) for i in np.flatnonzero(rejected).tolist()
    ]
    keep = pa.array(~rejected)
    canonical = [_one_value_lists(values[col].filter(keep)) for col in used]
    return pa.RecordBatch.from_arrays(canonical, schema=canonical_schema(config)), rejects


def _is_text(kind: pa.DataType) -> bool:
    t = pa.types
    return t.is_string(kind) or t.is_large_string(kind) or t.is_binary(kind) or t.is_large_binary(kind)


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


def _mark(reasons, columns, mask, reason, col):
    """Gives the rows in `mask` that have no reason yet `reason`, found in column `col`."""
    fresh = mask & (reasons == "")
    reasons[fresh] = reason
    columns[fresh] = col


def _detail(batch: pa.RecordBatch, i: int, reason: str, col: str, limit: int) -> str:
    value = batch.column(col)[i].as_py()
    if reason == OVERSIZED_FIELD:
        size = len(value.encode() if isinstance(value, str) else value)
        return f"column {col!r} holds {size} bytes, more than input.max_field_bytes ({limit})"
    if reason == MISSING_VALUE:
        return f"missing value in column {col!r}"
    shown = repr(_jsonable(value))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"not a valid {'int' if reason == BAD_INT else 'float'} in column {col!r}: {shown}"


def _one_value_lists(values: pa.Array) -> pa.Array:
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int64))
    return pa.LargeListArray.from_arrays(offsets, values)


def _jsonable(v):
    """A value JSON can hold: bytes as text, NaN and infinities as strings (JSON has neither)."""
    if isinstance(v, bytes):
        return _text(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# ----------------------------------------------------------------------------------------------
# Split


def eval_mask(batch: pa.RecordBatch, config: Config) -> np.ndarray:
    """True for the rows of a canonical batch that belong to the eval split.

    The split hashes (FarmHash fingerprint, as tf.strings.to_hash_bucket_fast) the split key
    columns joined with the config's salt, so a row's split never depends on batching, worker
    count or run.
    """
    keys = config.split.key or tuple(config.used_columns)
    parts = [pc.cast(pc.list_flatten(batch.column(k)), pa.string()) for k in keys]
    joined = pc.binary_join_element_wise(*parts, pa.scalar(config.split.salt), "\x1f")
    buckets = tf.strings.to_hash_bucket_fast(joined.to_numpy(zero_copy_only=False).astype(object), 100).numpy()
    return buckets < config.split.eval_percent

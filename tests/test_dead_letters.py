"""Dead letters, nothing lost: a corpus of defects mixed into real rows.

Every kind of defect is checked row by row on the parser (fast), and all of them together, mixed
into the tiny fixture's good rows, go through ONE preprocess run: for each kind, processed +
dead-lettered = input, and each bad row is in the dead-letter file with its raw text, file,
line, byte offset and reason, counted per reason in the manifest.
"""

import dataclasses
import glob
import gzip
import json
import os
import random

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline import rows
from pipeline.dead_letters import AddLineNumbers
from pipeline.preprocess import LOCAL_RUNNER, preprocess
from pipeline.sources import CsvLineBatches
from pipeline.transforms import DEAD, ParseAndValidate, ReadRawLogs
from schemas.loading import load_config

from support import FIXTURES, TINY_YAML, config_error, edited, tiny_yaml_text

HEADER = b"delay,carrier,tail,day,hour,distance"
MAX_FIELD_BYTES = 1000
BOOM = "BOOM"  # a carrier that makes validation raise (see `fail_on_boom`): the unexpected error


def _set(row: list[bytes], column: int, value: bytes) -> bytes:
    return b",".join(row[:column] + [value] + row[column + 1 :])


# name -> (dead-letter reason, or None where the row is processed; a real row -> the defective line)
KINDS = {
    "too_few_fields": (rows.MALFORMED_CSV, lambda r: b",".join(r[:-1])),
    "too_many_fields": (rows.MALFORMED_CSV, lambda r: b",".join(r + [b"extra"])),
    "unbalanced_quote": (rows.MALFORMED_CSV, lambda r: _set(r, 1, b'"' + r[1])),
    "bare_cr": (rows.MALFORMED_CSV, lambda r: _set(r, 2, r[2] + b"\r" + r[2])),
    "nul_byte": (rows.MALFORMED_CSV, lambda r: _set(r, 2, r[2] + b"\0")),
    "bad_int": (rows.BAD_INT, lambda r: _set(r, 4, r[4] + b"h")),
    "int_overflow": (rows.BAD_INT, lambda r: _set(r, 4, b"123456789012345678901")),
    "fractional_int": (rows.BAD_INT, lambda r: _set(r, 4, r[4] + b".5")),
    "bad_float": (rows.BAD_FLOAT, lambda r: _set(r, 5, b"13o6.8")),
    "nan_float": (rows.BAD_FLOAT, lambda r: _set(r, 0, b"NaN")),
    "float_overflow": (rows.BAD_FLOAT, lambda r: _set(r, 5, b"1e400")),
    "missing_required": (rows.MISSING_VALUE, lambda r: _set(r, 1, b"")),
    "null_marker": (rows.MISSING_VALUE, lambda r: _set(r, 0, b"NA")),
    "invalid_utf8": (rows.INVALID_UTF8, lambda r: _set(r, 1, r[1] + b"\xff\xfe")),
    "oversized_field": (rows.OVERSIZED_FIELD, lambda r: _set(r, 2, b"N" * (MAX_FIELD_BYTES + 1))),
    "empty_line": (rows.EMPTY_LINE, lambda r: b""),
    "whitespace_line": (rows.EMPTY_LINE, lambda r: b" \t "),
    "repeated_header": (rows.REPEATED_HEADER, lambda r: HEADER),
    "unexpected_error": (rows.UNEXPECTED_ERROR, lambda r: _set(r, 1, BOOM.encode())),
    # Odd but valid: processed.
    "byte_order_mark": (None, lambda r: b"\xef\xbb\xbf" + b",".join(r)),
    "crlf_ending": (None, lambda r: b",".join(r) + b"\r"),
    "quoted_delimiter": (None, lambda r: _set(r, 1, b'"' + r[1] + b', Inc ""x"""')),
    "padded_numbers": (None, lambda r: _set(r, 4, b" " + r[4] + b".0 ")),
    "field_at_limit": (None, lambda r: _set(r, 2, b"N" * MAX_FIELD_BYTES)),
}
COPIES = 2  # of each kind, in different real rows


def good_rows() -> list[list[bytes]]:
    """The tiny fixture's good rows (checked here independently of the parser)."""
    out = []
    for line in open(os.path.join(FIXTURES, "tiny.csv"), "rb").read().splitlines()[1:]:
        f = line.split(b",")
        try:
            ok = len(f) == 6 and all(f) and float(f[0]) == float(f[0]) and int(f[4]) >= 0 and float(f[5]) >= 0
        except ValueError:
            ok = False
        if ok:
            out.append(f)
    return out


def make_corpus(path: str) -> list[tuple[int, int, str, bytes]]:
    """Writes the corpus CSV (header with a BOM; real rows with COPIES of each kind mixed in at
    seeded positions, the first data line a defect; no newline after the last line). Returns
    (line number, byte offset, kind, line) for every data line; kind "good" for a real row."""
    rng = random.Random(5)
    real = good_rows()
    planted = [(kind, real[rng.randrange(len(real))]) for kind in KINDS for _ in range(COPIES)]
    rng.shuffle(planted)
    body = [("good", b",".join(r)) for r in real]
    for kind, row in planted:
        body.insert(rng.randrange(1, len(body)), (kind, KINDS[kind][1](row)))
    body.insert(0, ("too_few_fields", KINDS["too_few_fields"][1](real[0])))
    data = b"\xef\xbb\xbf" + HEADER + b"\n"
    out = []
    for number, (kind, line) in enumerate(body, start=2):
        out.append((number, len(data), kind, line))
        data += line + (b"\n" if number - 1 < len(body) else b"")
    with open(path, "wb") as f:
        f.write(data)
    return out


def corpus_config(tmp_path, csv_path: str):
    text = edited(
        tiny_yaml_text(max_field_bytes=MAX_FIELD_BYTES, max_bad_fraction=0.5), "path: tiny.csv", f"path: {csv_path}"
    )
    path = tmp_path / "corpus.yaml"
    path.write_text(text)
    return load_config(str(path))


def plant_failure(monkeypatch):
    """Makes validation raise (a stand-in for a bug) on any batch holding carrier BOOM."""
    validate = rows._validate

    def failing(batch, config):
        if BOOM in batch.column("carrier").to_pylist():
            raise RuntimeError("planted failure")
        return validate(batch, config)

    monkeypatch.setattr(rows, "_validate", failing)


@pytest.fixture
def fail_on_boom(monkeypatch):
    plant_failure(monkeypatch)


# ----------------------------------------------------------------------------------------------
# Row by row, on the parser


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_is_processed_or_dead_lettered_with_its_reason(kind, tiny_config, fail_on_boom):
    limit = dataclasses.replace(tiny_config.input, max_field_bytes=MAX_FIELD_BYTES)
    config = dataclasses.replace(tiny_config, input=limit)
    real = good_rows()
    defect = KINDS[kind][1](real[3])
    raw = rows.RawRows("f.csv", [b",".join(real[0]), defect, b",".join(real[1])], [7, 8, 9], [100, 150, 200])
    reason = KINDS[kind][0]
    if reason == rows.UNEXPECTED_ERROR:
        with pytest.raises(RuntimeError, match="planted"):
            rows.parse_and_validate(raw, config)
        dead = rows.unexpected_error(raw.one_by_one()[1], "RuntimeError('planted failure')")
        good = rows.parse_and_validate(raw.one_by_one()[0], config)[0]
        assert good.num_rows == 1
    else:
        good, dead = rows.parse_and_validate(raw, config)
        assert good.num_rows + len(dead) == 3
        assert good.schema == rows.canonical_schema(config)
    assert [d.reason for d in dead] == ([reason] if reason else [])
    for d in dead:
        assert (d.source, d.line, d.offset) == ("f.csv", 8, 150)
        assert d.row == defect.decode("utf-8", "backslashreplace")


def test_details_name_the_column_and_the_value(tiny_config):
    lines = [b"1,AA,N1,Mon,12h,100", b"1,AA," + b"N" * 70000 + b",Mon,3,100", b"1,,N1,Mon,3,100", b"x,y"]
    good, dead = rows.parse_and_validate(rows.RawRows("f.csv", lines, [2, 3, 4, 5], [0, 1, 2, 3]), tiny_config)
    assert good.num_rows == 0
    assert [d.detail for d in dead] == [
        "not a valid int in column 'hour': '12h'",
        "column 'tail' holds 70000 bytes, more than input.max_field_bytes (65536)",
        "missing value in column 'carrier'",
        "expected 6 fields, got 2",
    ]


def test_parquet_defects_keep_their_typed_values_and_row_numbers(tiny_config):
    batch = pa.RecordBatch.from_pydict(
        {
            "delay": pa.array([1.0, float("nan"), 3.0, 4.0, 5.0, 6.0, 7.0]),
            "carrier": pa.array(["AA", "UA", None, "AA", "A" * 70000, "DL", "DL"]).dictionary_encode(),
            "tail": pa.array(["N1"] * 7),
            "day": pa.array(["Mon"] * 7),
            "hour": pa.array([1.0, 2.0, 3.0, 1.5, 5.0, 1e300, 7.0]),  # floats in an int column
            "distance": pa.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, float("inf")]),
        }
    )
    good, dead = rows.parse_and_validate(rows.RawRows("f.parquet", batch, range(11, 18)), tiny_config)
    assert good.num_rows == 1 and good.column("hour").to_pylist() == [[1]]
    assert [(d.line, d.reason) for d in dead] == [
        (12, rows.MISSING_VALUE),
        (13, rows.MISSING_VALUE),
        (14, rows.BAD_INT),
        (15, rows.OVERSIZED_FIELD),
        (16, rows.BAD_INT),
        (17, rows.BAD_FLOAT),
    ]
    assert dead[0].row["delay"] == "nan" and dead[-1].row["distance"] == "inf"  # JSON has no NaN or Infinity
    assert {d.offset for d in dead} == {None} and json.dumps([d.to_json_dict() for d in dead], allow_nan=False)


def test_parquet_files_are_checked_before_the_job(tiny_config):
    good = pa.schema([(c, pa.string()) for c in tiny_config.raw_columns])
    rows.check_parquet_schema(good, tiny_config, "f.parquet")
    with pytest.raises(rows.InputError, match=r"f.parquet: columns \['hour'\] declared in .* are not in the data"):
        rows.check_parquet_schema(pa.schema([f for f in good if f.name != "hour"]), tiny_config, "f.parquet")
    nested = pa.schema([f if f.name != "hour" else pa.field("hour", pa.list_(pa.int64())) for f in good])
    with pytest.raises(rows.InputError, match=r"column 'hour' is list<item: int64>, not a single value"):
        rows.check_parquet_schema(nested, tiny_config, "f.parquet")


def test_max_bad_fraction_fails_with_one_clear_line(tiny_config):
    rows.check_bad_fraction(100, {rows.BAD_INT: 10}, tiny_config, "out/rejected-*.jsonl")  # 10% is allowed
    rows.check_bad_fraction(0, {}, tiny_config, "out/rejected-*.jsonl")
    with pytest.raises(rows.InputError) as e:
        dead = {rows.BAD_INT: 6, rows.EMPTY_LINE: 1, rows.MALFORMED_CSV: 3, "x": 1}
        rows.check_bad_fraction(100, dead, tiny_config, "out/r-*.jsonl")
    assert str(e.value) == (
        f"{tiny_config.source}: input.max_bad_fraction: 11 of 100 rows read (11.0%) were dead-lettered, more than "
        "the 0.1 allowed (top reasons: bad_int 6, malformed_csv 3, empty_line 1); "
        "the rejected rows are in out/r-*.jsonl"
    )
    strict = dataclasses.replace(tiny_config, input=dataclasses.replace(tiny_config.input, max_bad_fraction=0.0))
    with pytest.raises(rows.InputError, match="1 of 1000 rows read"):
        rows.check_bad_fraction(1000, {rows.BAD_INT: 1}, strict, "p")


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("max_bad_fraction", "1.5", "expected a number between 0 and 1, got 1.5"),
        ("max_bad_fraction", "'10%'", "expected a number between 0 and 1, got '10%'"),
        ("max_bad_fraction", "true", "expected a number between 0 and 1, got True"),
        ("max_field_bytes", "0", "expected an integer between 1 and 1073741824, got 0"),
        ("max_field_bytes", "64KB", "expected an integer, got '64KB'"),
    ],
)
def test_limits_are_validated_at_load(write_config, field, value, problem):
    path = write_config(tiny_yaml_text(**{field: value}))
    assert config_error(path) == f"{path}: input.{field}: {problem}"


def test_limits_default_and_load(tiny_config, write_config):
    assert (tiny_config.input.max_field_bytes, tiny_config.input.max_bad_fraction) == (65536, 0.1)
    config = load_config(write_config(tiny_yaml_text(max_bad_fraction=0, max_field_bytes=10)))
    assert (config.input.max_field_bytes, config.input.max_bad_fraction) == (10, 0.0)


# ----------------------------------------------------------------------------------------------
# Line numbers and offsets


def _reader_corpus(tmp_path) -> tuple:
    path = tmp_path / "f.csv"
    lines = [b"h1,h2"] + [b"%d,%s" % (i, b"x" * (i % 7)) for i in range(300)]
    lines[5], lines[9] = b"a,\rb", b""
    path.write_bytes(b"\r\n".join(lines[:3]) + b"\r\n" + b"\n".join(lines[3:]))
    return path, lines


@pytest.mark.parametrize("block_bytes", [1, 2, 50, 1 << 20])  # lines (and CRLFs) straddle block ends, and piece ends
def test_reader_gives_every_line_its_offset_and_a_line_where_its_piece_starts_the_file(tmp_path, block_bytes):
    path, lines = _reader_corpus(tmp_path)
    check_pieces(path, lines, block_bytes, piece_bytes=300)


def test_reader_reads_a_compressed_file_whole_with_every_line_numbered(tmp_path):
    path, lines = _reader_corpus(tmp_path)
    content = path.read_bytes()
    with gzip.open(tmp_path / "f.csv.gz", "wb") as f:
        f.write(content)
    read = check_pieces(tmp_path / "f.csv.gz", lines, 7, piece_bytes=300, content=content)
    assert [line for _, _, line, _ in read] == list(range(2, 302))


def check_pieces(path, lines, block_bytes, piece_bytes, content=None):
    """Reads `path` piece by piece; `content`: the uncompressed bytes of a compressed file."""
    compressed = content is not None
    content = content or path.read_bytes()
    source = CsvLineBatches(str(path), skip_header_lines=1, block_bytes=block_bytes)
    read = []
    for piece in source.split(desired_bundle_size=piece_bytes):
        for raw in piece.source.read(piece.source.get_range_tracker(piece.start_position, piece.stop_position)):
            read += [(raw.source, o, n, t) for o, n, t in zip(raw.offsets, raw.lines, raw.data)]
    assert len(read) == 300
    assert sorted(text for _, _, _, text in read) == sorted(lines[1:])
    numbered = [line for _, _, line, _ in read if line is not None]
    if not compressed:
        assert 0 < len(numbered) < 300  # only the first piece knows its line numbers
    for _, offset, line, text in read:
        assert content[offset:].split(b"\n")[0].rstrip(b"\r") == text
        assert line is None or line == content[:offset].count(b"\n") + 1
    return read


class SplitDuringClaim:
    """An OffsetRangeTracker that is split at `splits[0]` just before its `at`-th claim and at
    `splits[1]` just after it, as a runner's dynamic splits arriving while the reader works."""

    def __init__(self, tracker, at, splits):
        self.tracker, self.at, self.splits, self.claims = tracker, at, splits, 0

    def try_claim(self, position):
        self.claims += 1
        if self.claims == self.at:
            assert self.tracker.try_split(self.splits[0])
        claimed = self.tracker.try_claim(position)
        if self.claims == self.at:
            self.tracker.try_split(self.splits[1])
        return claimed

    def __getattr__(self, name):
        return getattr(self.tracker, name)


@pytest.mark.parametrize("at", [2, 3])  # (no split is accepted before a first claim)
@pytest.mark.parametrize("second", [0, 7])
def test_reader_split_while_claiming_reads_every_line_once(tmp_path, at, second):
    """Splits that land while the reader claims a batch: the piece keeps the lines before the
    final stop, the residual reads from there, and no later split can fall among the lines
    already handed out."""
    lines = [b"h"] + [b"%05d" % i for i in range(100)]  # 6 bytes a line
    path = tmp_path / "f.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    size = path.stat().st_size
    [whole] = CsvLineBatches(str(path), skip_header_lines=1, block_bytes=60).split(desired_bundle_size=2 * size)
    source = whole.source  # the file's source, read 10 lines a batch
    split_at = 2 + 6 * (10 * (at - 1) + 4) + 3  # inside the 5th line of the at-th batch
    tracker = SplitDuringClaim(source.get_range_tracker(0, size), at, [split_at, split_at - second])
    primary = [raw for raw in source.read(tracker)]
    stop = tracker.stop_position()
    residual = [t for raw in source.read(source.get_range_tracker(stop, size)) for t in raw.data]
    assert stop <= split_at
    assert [t for raw in primary for t in raw.data] + residual == lines[1:]
    last = primary[-1].offsets[-1]
    assert last < stop and tracker.try_split(last) is None and tracker.try_split(last - 3) is None


def test_dead_letters_from_mid_file_pieces_get_their_line_numbers(tmp_path):
    """A file big enough to be read in several pieces: AddLineNumbers (blocks of 100 kB) fills in
    the lines the later pieces could not know."""
    rng = random.Random(7)
    real = good_rows()
    lines = [HEADER]
    for _ in range(70_000):  # ~2.5 MB: the local runner reads it in two pieces or more
        lines.append(b",".join(real[rng.randrange(len(real))]) if rng.random() > 0.001 else b"1,2,3")
    path = tmp_path / "big.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = load_config(TINY_YAML).with_input_path(str(path))
    expected = [(i + 1, rows.MALFORMED_CSV) for i, line in enumerate(lines) if line == b"1,2,3"]
    with TestPipeline(runner=LOCAL_RUNNER) as p:
        read = p | ReadRawLogs(config)
        dead = read.rows | ParseAndValidate(config)
        found = dead[DEAD] | AddLineNumbers(block_size=100_000) | beam.Map(lambda d: (d.line, d.reason))
        assert_that(found, equal_to(expected))
    assert len(expected) > 20


# ----------------------------------------------------------------------------------------------
# The corpus, through one preprocess run


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("corpus")
    csv_path = str(tmp_path / "corpus.csv")
    planted = make_corpus(csv_path)
    config = corpus_config(tmp_path, csv_path)
    with pytest.MonkeyPatch.context() as monkeypatch:
        plant_failure(monkeypatch)
        section = preprocess(config, str(tmp_path / "out"))
    letters = [json.loads(line) for f in sorted(glob.glob(section["outputs"]["dead_letter"])) for line in open(f)]
    return planted, config, section, letters


def test_corpus_has_at_least_twelve_kinds_of_defect():
    assert len({reason for reason, _ in KINDS.values() if reason}) >= 8
    assert sum(1 for reason, _ in KINDS.values() if reason) >= 12


def test_every_row_of_the_corpus_is_processed_or_dead_lettered(corpus_run):
    planted, _, section, letters = corpus_run
    counts = section["rows"]
    assert counts["read"] == len(planted)
    expected_dead = [p for p in planted if p[2] != "good" and KINDS[p[2]][0]]
    assert counts["dead_letter"] == len(letters) == len(expected_dead)
    assert counts["train"] + counts["eval"] == len(planted) - len(expected_dead)
    by_reason = {}
    for _, _, kind, _ in expected_dead:
        by_reason[KINDS[kind][0]] = by_reason.get(KINDS[kind][0], 0) + 1
    assert counts["dead_letter_by_reason"] == dict(sorted(by_reason.items()))


def test_each_kind_adds_up_and_each_bad_row_is_in_the_dead_letter_file(corpus_run):
    planted, config, _, letters = corpus_run
    by_line = {d["line"]: d for d in letters}
    assert len(by_line) == len(letters)
    for kind, (reason, _) in sorted(KINDS.items()):
        rows_in = [p for p in planted if p[2] == kind]
        dead = [by_line[line] for line, _, _, _ in rows_in if line in by_line]
        assert len(rows_in) >= COPIES and len(dead) == (len(rows_in) if reason else 0), kind
        for (line, offset, _, text), d in zip(rows_in, dead):
            assert (d["line"], d["offset"], d["reason"]) == (line, offset, reason), kind
            assert d["source"] == config.input.path
            assert d["row"] == text.decode("utf-8", "backslashreplace"), kind
    unexpected = [d for d in letters if d["reason"] == rows.UNEXPECTED_ERROR]
    assert all(d["detail"].startswith("RuntimeError('planted failure') (File ") for d in unexpected)


def test_the_corpus_counts_against_max_bad_fraction(corpus_run):
    _, config, section, _ = corpus_run
    counts = section["rows"]
    strict = dataclasses.replace(config, input=dataclasses.replace(config.input, max_bad_fraction=0.05))
    where = section["outputs"]["dead_letter"]
    with pytest.raises(rows.InputError) as e:
        rows.check_bad_fraction(counts["read"], counts["dead_letter_by_reason"], strict, where)
    read, dead = counts["read"], counts["dead_letter"]
    assert f"input.max_bad_fraction: {dead} of {read} rows read ({dead / read:.1%}) were dead-lettered" in str(e.value)
    assert "(top reasons: malformed_csv 11, " in str(e.value) and str(e.value).endswith(where)

"""Row-level parsing and validation: every input line is either a good row or a dead letter."""

import os

import numpy as np
import pyarrow as pa
import pytest

from embedpipe import stages
from pipeline import rows
from schemas.features import raw_feature_spec
from schemas.loading import load_config

from support import FIXTURES, edited


def _lines(config):
    with open(config.input.path, "rb") as f:
        return f.read().splitlines()[1:]  # without the header


def test_fixture_lines_are_parsed_or_dead_lettered(tiny_config):
    lines = _lines(tiny_config)
    parsed, dead_parse = rows.parse_csv_lines(lines, tiny_config, "tiny.csv")
    good, dead_valid = rows.validate_batch(parsed, tiny_config, "tiny.csv")
    assert len(lines) == 244
    assert good.num_rows + len(dead_parse) + len(dead_valid) == len(lines)
    reasons = sorted(d.reason for d in dead_parse + dead_valid)
    assert reasons == [rows.BAD_FLOAT, rows.EMPTY_LINE, rows.MALFORMED_CSV, rows.MISSING_VALUE]
    assert good.schema == rows.canonical_schema(tiny_config)
    assert {d.source for d in dead_parse + dead_valid} == {"tiny.csv"}


def test_each_defect_gets_its_reason_and_keeps_the_raw_row(tiny_config):
    lines = [
        b"1.5,AA,N1,Mon,3,100",  # good
        b"1.5,AA,N1,Mon,3",  # short
        b'1.5,"AA,N1,Mon,3,100',  # unbalanced quote
        b"1.5,A\xff,N1,Mon,3,100",  # not UTF-8
        b"   ",  # blank
        b"x,AA,N1,Mon,3,100",  # bad float label
        b"1.5,AA,N1,Mon,three,100",  # bad int
        b"1.5,,N1,Mon,3,100",  # missing carrier
        b'2.5,"B, Inc",N1,Tue,4.0,1e3',  # quoted delimiter, int written as 4.0, exponent float
    ]
    parsed, dead_parse = rows.parse_csv_lines(lines, tiny_config, "f.csv")
    good, dead_valid = rows.validate_batch(parsed, tiny_config, "f.csv")
    dead = dead_parse + dead_valid
    assert good.num_rows + len(dead) == len(lines)
    by_reason = {d.reason: d for d in dead}
    assert set(by_reason) == {
        rows.MALFORMED_CSV,
        rows.INVALID_UTF8,
        rows.EMPTY_LINE,
        rows.BAD_FLOAT,
        rows.BAD_INT,
        rows.MISSING_VALUE,
    }
    assert [d.reason for d in dead].count(rows.MALFORMED_CSV) == 2
    assert by_reason[rows.BAD_INT].row["hour"] == "three"
    assert "carrier" in by_reason[rows.MISSING_VALUE].detail
    assert good.column("carrier").to_pylist() == [[b"AA"], [b"B, Inc"]]
    assert good.column("hour").to_pylist() == [[3], [4]]
    assert good.column("distance").to_pylist() == [[100.0], [1000.0]]


@pytest.mark.parametrize("blank", [b"", b"   ", b"\t", b"\x0b \x0c"])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_blank_lines_are_found_in_batches_with_no_other_rare_bytes(tiny_config, blank, where):
    # No quote, CR, NUL, BOM or header anywhere: the batch takes the path that looks at no line
    # on its own, which must still find an empty or whitespace-only line, first, inside or last.
    lines = [b"1.5,AA,N1,Mon,3,100", b"2.5,UA,N2,Tue,4,200"]
    lines.insert(where, blank)
    parsed, dead = rows.parse_csv_lines(lines, tiny_config, "f.csv")
    assert parsed.num_rows == 2 and [d.reason for d in dead] == [rows.EMPTY_LINE]
    assert parsed.column("carrier").to_pylist() == ["AA", "UA"]


def test_typed_parquet_batches_validate_and_fill_defaults(tiny_config):
    import dataclasses

    config = dataclasses.replace(
        tiny_config, input=dataclasses.replace(tiny_config.input, defaults={"tail": "unknown"})
    )
    batch = pa.RecordBatch.from_pydict(
        {
            "delay": pa.array([1.0, float("nan"), 3.0]),
            "carrier": pa.array(["AA", "UA", "DL"]).dictionary_encode(),
            "tail": pa.array([None, "N1", "N2"]),
            "day": pa.array(["Mon", "Tue", "Wed"]),
            "hour": pa.array([1, 2, 3]),
            "distance": pa.array([10.0, 20.0, 30.0]),
        }
    )
    good, dead = rows.validate_batch(batch, config, "f.parquet")
    assert good.num_rows == 2 and [d.reason for d in dead] == [rows.MISSING_VALUE]
    assert "delay" in dead[0].detail  # NaN counts as missing
    assert good.column("tail").to_pylist() == [[b"unknown"], [b"N2"]]


def test_split_is_deterministic_and_independent_of_batching(tiny_config):
    parsed, _ = rows.parse_csv_lines(_lines(tiny_config), tiny_config, "tiny.csv")
    good, _ = rows.validate_batch(parsed, tiny_config, "tiny.csv")
    whole = rows.eval_mask(good, tiny_config)
    pieces = np.concatenate([rows.eval_mask(good.slice(i, 50), tiny_config) for i in range(0, good.num_rows, 50)])
    np.testing.assert_array_equal(whole, pieces)
    assert 0.1 < whole.mean() < 0.4  # eval_percent: 25


def test_csv_header_must_name_the_configured_columns(tiny_config):
    rows.check_csv_header(b"\xef\xbb\xbfdelay,carrier,tail,day,hour,distance\r\n", tiny_config, "ok.csv")
    with pytest.raises(rows.InputError, match=r"swapped.csv: header \['delay', 'tail', 'carrier'"):
        rows.check_csv_header(b"delay,tail,carrier,day,hour,distance\n", tiny_config, "swapped.csv")


def test_lines_never_split_or_double_count(tiny_config):
    long_value = b"N" + b"x" * 2**21  # longer than pyarrow's default block
    lines = [b"1.5,UA,N1\rTue,12,100", b"1.5,UA,N1,Tue,12", b"2,UA," + long_value + b",Tue,12,100"]
    parsed, dead = rows.parse_csv_lines(lines, tiny_config, "f.csv")
    assert parsed.num_rows == 1 and [d.reason for d in dead] == [rows.MALFORMED_CSV, rows.MALFORMED_CSV]


def test_ints_are_exact_and_out_of_range_values_are_dead_letters(tiny_config):
    lines = [b"1,AA,N1,Mon,9007199254740993,1", b"1,AA,N1,Mon,99999999999999999999,1", b"1,AA,N1,Mon,3,1e400"]
    parsed, _ = rows.parse_csv_lines(lines, tiny_config, "f.csv")
    good, dead = rows.validate_batch(parsed, tiny_config, "f.csv")
    assert good.column("hour").to_pylist() == [[9007199254740993]]
    assert [d.reason for d in dead] == [rows.BAD_INT, rows.BAD_FLOAT]
    typed = pa.RecordBatch.from_pydict(
        {
            "delay": [1.0, 2.0, 3.0],
            "carrier": [7, 8, 9],
            "tail": ["a", "b", "c"],
            "day": ["x", "y", "z"],
            "hour": [1.5, 2.0, 1e300],
            "distance": [1.0, 2.0, 3.0],
        }
    )
    good, dead = rows.validate_batch(typed, tiny_config, "f.parquet")
    assert good.column("hour").to_pylist() == [[2]] and good.column("carrier").to_pylist() == [[b"8"]]
    assert [d.reason for d in dead] == [rows.BAD_INT, rows.BAD_INT]


# Unused columns: `note` and `code` are declared (the header names them) but nothing reads them.
UNUSED_CSV = os.path.join(FIXTURES, "unused_columns.csv")
UNUSED_YAML = f"""
name: unused
input:
  format: csv
  path: {UNUSED_CSV}
  max_field_bytes: 100
  columns: {{y: float, a: string, b: int, note: string, code: int}}
label: {{column: y, task: regression}}
categorical:
  a: {{type: vocabulary}}
numeric:
  b: {{normalize: zscore}}
"""
# The same file with both columns read: their bad values dead-letter their rows again.
USED_YAML = edited(
    edited(UNUSED_YAML, "  a: {type: vocabulary}\n", "  a: {type: vocabulary}\n  note: {type: vocabulary}\n"),
    "  b: {normalize: zscore}\n",
    "  b: {normalize: zscore}\n  code: {normalize: zscore}\n",
)


def _unused_fixture(write_config, text):
    config = load_config(write_config(text))
    lines = _lines(config)
    raw = rows.RawRows("unused_columns.csv", lines, list(range(2, len(lines) + 2)))
    return config, lines, rows.parse_and_validate(raw, config)


def test_unused_columns_are_not_validated(write_config):
    config, lines, (good, dead) = _unused_fixture(write_config, UNUSED_YAML)
    assert config.used_columns == {"y": "float", "a": "string", "b": "int"}
    assert dead == [] and good.num_rows == len(lines) == 20  # empty, malformed and 300-byte values kept
    assert good.schema.names == ["y", "a", "b"]  # tf.Transform and serving never see note or code
    assert sorted(raw_feature_spec(config)) == ["a", "b", "y"]


def test_the_same_columns_used_dead_letter_their_bad_values(write_config):
    config, lines, (good, dead) = _unused_fixture(write_config, USED_YAML)
    assert good.num_rows + len(dead) == len(lines) == 20
    assert [(d.line, d.reason) for d in dead] == [
        (3, rows.MISSING_VALUE),  # note and code empty
        (4, rows.BAD_INT),  # code n/a
        (5, rows.OVERSIZED_FIELD),  # note 300 bytes
        (6, rows.BAD_INT),  # code 1.5
        (7, rows.BAD_INT),  # code -
    ]
    assert dead[0].row == "2.0,y,2,," and dead[2].row.startswith("4.0,y,4,zzz")  # the whole raw line


def test_a_run_keeps_every_row_whose_only_bad_values_are_unused(write_config, tmp_path):
    section = stages.preprocess(["--config", write_config(UNUSED_YAML), "--output", str(tmp_path / "out")])
    counts = section["rows"]
    assert (counts["read"], counts["train"] + counts["eval"], counts["dead_letter"]) == (20, 20, 0)

"""Export round trip: what `write_table` writes, `load_table` reads back exactly, or refuses."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.tables import TableSpec
from trainer.export import write_table
from trainer.tables import TableError, escape_key, load_table, sha256_file, unescape_key, verify_table

KEYS = ["plain", "with space", "tab\there", "new\nline", "back\\slash\\t", "naïve ☕", "<OOV 0>"]


@pytest.fixture
def table_dir(tmp_path):
    vectors = np.random.default_rng(1).normal(size=(len(KEYS), 3)).astype(np.float32)
    # Not a vocabulary table: a vocabulary cannot hold a line break (tf.Transform filters them out,
    # and vocabulary.txt is line-based; test_formats covers vocabulary tables), every other file can.
    spec = TableSpec("t", "bucket", ("c",), len(KEYS), 3, None, 1)
    frequency = np.arange(len(KEYS), dtype=np.int64)[::-1].copy()
    path = write_table(str(tmp_path / "t"), spec, KEYS, vectors, frequency, {"output_dir": "run"})
    return path, vectors, frequency


def test_round_trip_is_exact_for_awkward_keys(table_dir):
    path, vectors, frequency = table_dir
    table = load_table(path)
    assert table.keys == KEYS
    np.testing.assert_array_equal(table.vectors, vectors)  # bitwise
    np.testing.assert_array_equal(table.frequencies, frequency)
    np.testing.assert_array_equal(table["tab\there"], vectors[2])
    assert set(table.as_dict()) == set(KEYS)
    with pytest.raises(KeyError, match="no key 'missing'"):
        table.vector("missing")
    lines = open(os.path.join(path, "vectors.w2v.txt"), encoding="utf-8").read().split("\n")
    assert lines[0] == f"{len(KEYS) - 1} 3" and lines[-1] == ""  # the real rows; "<OOV 0>" left out
    assert [unescape_key(line.split(" ")[0]) for line in lines[1:-1]] == KEYS[:-1]
    np.testing.assert_array_equal(np.array([line.split(" ")[1:] for line in lines[1:-1]], np.float32), vectors[:-1])


def test_parquet_and_projector_files_agree(table_dir):
    path, vectors, frequency = table_dir
    parquet = pq.read_table(os.path.join(path, "table.parquet")).to_pydict()
    assert parquet["key"] == KEYS and parquet["row"] == list(range(len(KEYS)))
    np.testing.assert_array_equal(np.array(parquet["vector"], dtype=np.float32), vectors)
    metadata = open(os.path.join(path, "metadata.tsv"), encoding="utf-8").read().splitlines()
    assert metadata[0] == "key\tfrequency" and len(metadata) == len(KEYS) + 1
    assert [unescape_key(line.rsplit("\t", 1)[0]) for line in metadata[1:]] == KEYS
    tensor = np.loadtxt(os.path.join(path, "vectors.tsv"), delimiter="\t", dtype=np.float32)
    np.testing.assert_array_equal(tensor, vectors)
    config = open(os.path.join(path, "projector_config.pbtxt")).read()
    assert 'tensor_path: "vectors.tsv"' in config and 'metadata_path: "metadata.tsv"' in config


def test_damaged_or_inconsistent_tables_are_refused(table_dir):
    path, _, _ = table_dir
    with open(os.path.join(path, "vectors.npy"), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    with pytest.raises(TableError, match="vectors.npy: checksum does not match"):
        load_table(path)
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["rows"] = 99
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(TableError, match="declares 99 rows"):
        load_table(path, verify=False)
    with pytest.raises(TableError, match="missing"):
        load_table(os.path.dirname(path))


def test_verify_table_checks_every_file_and_the_shapes_without_loading(table_dir):
    path, _, _ = table_dir
    assert verify_table(path)["rows"] == len(KEYS)
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    for field, value, message in [
        ("rows", 99, r"vectors.npy: float32 \(7, 3\), the manifest declares float32 \(99, 3\)"),
        ("dim", 4, r"vectors.npy: float32 \(7, 3\), the manifest declares float32 \(7, 4\)"),
    ]:
        json.dump({**manifest, field: value}, open(manifest_path, "w"))
        with pytest.raises(TableError, match=message):
            verify_table(path)
    json.dump(manifest, open(manifest_path, "w"))
    with open(os.path.join(path, "keys.tsv"), "a") as f:
        f.write("extra\n")
    with pytest.raises(TableError, match="keys.tsv: checksum does not match"):
        verify_table(path)
    _rechecksum(path, manifest, "keys")
    with pytest.raises(TableError, match="keys.tsv: 8 keys, the manifest declares 7 rows"):
        verify_table(path)
    os.remove(os.path.join(path, "vectors.w2v.txt"))  # a file load_table never reads
    with pytest.raises(TableError, match="vectors.w2v.txt: missing"):
        verify_table(path)


def test_a_keys_file_with_text_after_its_last_line_or_vectors_not_npy_are_refused(table_dir):
    path, _, _ = table_dir
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    with open(os.path.join(path, "keys.tsv"), "a") as f:
        f.write("appended")  # 7 lines still, and a key that no line feed ends
    _rechecksum(path, manifest, "keys")
    for check in (verify_table, load_table):
        with pytest.raises(TableError, match="keys.tsv: text after the last line feed"):
            check(path)
    with open(os.path.join(path, "keys.tsv"), "w") as f:
        f.write("".join(escape_key(k) + "\n" for k in KEYS))
    _rechecksum(path, manifest, "keys")
    with open(os.path.join(path, "vectors.npy"), "wb") as f:
        f.write(b"not a numpy file")
    _rechecksum(path, manifest, "vectors")
    with pytest.raises(TableError, match="vectors.npy: not a .npy file np.load reads"):
        verify_table(path)
    np.save(os.path.join(path, "vectors.npy"), np.zeros((len(KEYS), 3), np.float64))
    _rechecksum(path, manifest, "vectors")
    for check in (verify_table, load_table):
        with pytest.raises(TableError, match=r"vectors.npy: float64 \(7, 3\), the manifest declares float32"):
            check(path)


def _rechecksum(path: str, manifest: dict, name: str) -> None:
    """Writes the table's manifest with file `name`'s sha256 as it is now (a consistent damage)."""
    entry = manifest["files"][name]
    entry["sha256"] = sha256_file(os.path.join(path, entry["path"]))
    json.dump(manifest, open(os.path.join(path, "manifest.json"), "w"))


def test_escaping_is_reversible():
    for key in KEYS + ["\\", "\\n", "\\s", "a\\\tb", "\r\n", " \\ s "]:
        assert "\n" not in escape_key(key) and "\t" not in escape_key(key)
        assert unescape_key(escape_key(key)) == key
        assert " " not in escape_key(key, space=True) and unescape_key(escape_key(key, space=True)) == key


def test_a_vocabulary_key_with_a_line_break_is_refused(tmp_path):
    spec = TableSpec("v", "vocabulary", ("c",), 2, 2, 2, 0)
    with pytest.raises(ValueError, match="table v: key 'new\\\\nline' .* line break"):
        write_table(
            str(tmp_path / "v"), spec, ["ok", "new\nline"], np.zeros((2, 2), np.float32), np.ones(2, np.int64), {}
        )

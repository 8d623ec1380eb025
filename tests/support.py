"""Paths and helpers several test modules share (fixtures are in conftest.py)."""

import importlib.util
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from schemas import layout
from schemas.manifest import read_manifest, update_manifest
from schemas.tables import TableSpec
from trainer.export import write_table
from trainer.tables import load_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FLEX_MAIN = os.path.join(ROOT, "deploy", "dataflow", "main.py")  # the Flex Template's launcher
TINY_YAML = os.path.join(FIXTURES, "tiny.yaml")
TINY_WATCH_YAML = os.path.join(FIXTURES, "tiny_watch.yaml")

# A small supervised config: one vocabulary feature and one cross (tests vary it by replacing text).
SMALL_CONFIG = """
name: t
input:
  format: csv
  path: data.csv
  columns: {y: float, a: string, b: int, f: float}
label: {column: y, task: regression}
categorical:
  a: {type: vocabulary, top_k: 10}
crosses:
  a_x_b: {columns: [a, b], type: hash, hash_buckets: 32}
"""


def own_copy(directory: str, tmp_path) -> str:
    """A copy of an output root or run directory made by a module-scoped fixture, for one test
    to write into, so that tests sharing the fixture never see each other's runs. A root copies
    whole: `LATEST` names its run by a path relative to the root."""
    copy = str(tmp_path / os.path.basename(directory.rstrip("/")))
    shutil.copytree(directory, copy)
    return copy


def edited(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new`; fails the test when `old` is not there (a config
    edit that silently did nothing would test the unedited config)."""
    assert old in text, f"{old!r} is not in the text to edit"
    return text.replace(old, new)


def tiny_yaml_text(**input_fields) -> str:
    """tiny.yaml's text, with `input_fields` added to its `input:` section."""
    with open(TINY_YAML) as f:
        text = f.read()
    added = "".join(f"  {k}: {v}\n" for k, v in input_fields.items())
    return edited(text, "  columns:\n", f"{added}  columns:\n")


def config_error(path: str) -> str:
    """Loads the config at `path`, which must fail; returns the ConfigError's message, which must
    start with the path."""
    from schemas.errors import ConfigError
    from schemas.loading import load_config

    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    return message


def load_module(path: str, name: str):
    """The Python file at `path` imported as a module named `name` (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root, run_id, digest="abc", table="t", keys=("a", "b", "<OOV 0>")):
    """A finished run directory with one exported vocabulary table (its last key the OOV row),
    as the stages would leave it."""
    path = layout.run_dir(str(root), run_id)
    spec = TableSpec(table, "vocabulary", ("c",), len(keys), 2, len(keys) - 1, 1)
    written = write_table(
        os.path.join(path, "export", table),
        spec,
        list(keys),
        np.eye(len(keys), 2, dtype=np.float32),
        np.ones(len(keys), np.int64),
        {},
    )
    update_manifest(path, "preprocess", {"config": {"sha256": digest}})
    update_manifest(path, "train", {})
    update_manifest(path, "export", {"tables": {table: written}})
    return path


# -- a run's outputs, comparable between runners and filesystems (local disk, gs://) ----------


def examples(out: str, split: str) -> list[bytes]:
    """Every example of a split, re-serialized deterministically (feature map sorted by key), sorted.

    Raw records differ between runners: the transformed columns, hence the feature map entries,
    can come out in another order (in a portable runner's SDK harness process)."""
    files = sorted(tf.io.gfile.glob(layout.examples_pattern(out, split)))
    assert files, f"no {split} shards under {out}"
    return sorted(
        tf.train.Example.FromString(record.numpy()).SerializeToString(deterministic=True)
        for record in tf.data.TFRecordDataset(files, compression_type="GZIP")
    )


def read_dir(path: str) -> dict[str, bytes]:
    """{file name: bytes} of the files of a folder (not below it), on any filesystem."""
    files = {}
    for name in sorted(n for n in tf.io.gfile.listdir(path) if not n.endswith("/")):
        with tf.io.gfile.GFile(os.path.join(path, name), "rb") as f:
            files[name] = f.read()
    return files


def dead_letters(out: str) -> list[str]:
    """JSON lines of all dead-letter shards, sorted (their order differs between runners)."""
    lines = []
    for path in tf.io.gfile.glob(layout.dead_letter_pattern(out)):
        with tf.io.gfile.GFile(path) as f:
            lines.extend(line.rstrip("\n") for line in f if line.strip())
    return sorted(lines)


def preprocess_outputs(out: str) -> dict:
    """What the Beam job wrote under `out`, comparable between two jobs: vocabularies and the other
    transform assets, the transformed metadata, both splits' examples, the dead letters, the id
    and row counts."""
    transform = layout.transform_dir(out)
    return {
        "assets": read_dir(os.path.join(transform, "transform_fn", "assets")),
        "metadata": read_dir(os.path.join(transform, "transformed_metadata")),
        **{split: examples(out, split) for split in layout.SPLITS},
        "dead_letters": dead_letters(out),
        "id_counts": layout.read_id_counts(out),
        "row_counts": layout.read_json(layout.row_counts_path(out)),
    }


def exported_tables(run: str) -> dict[str, tuple[list[str], bytes]]:
    """{table: (keys, the vectors' bytes)} of a run's export: equal only when bitwise equal."""
    tables = {}
    for name, path in read_manifest(run)["export"]["tables"].items():
        table = load_table(path)
        tables[name] = (table.keys, table.vectors.tobytes())
    return tables

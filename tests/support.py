"""Paths and helpers several test modules share (fixtures are in conftest.py)."""

import os
import shutil

import numpy as np
import pytest

from schemas import layout
from schemas.manifest import update_manifest
from schemas.tables import TableSpec
from trainer.export import write_table

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
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
    from schemas.config import ConfigError
    from schemas.loading import load_config

    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    return message


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

"""Paths and helpers several test modules share (fixtures are in conftest.py)."""

import os

import pytest

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


def tiny_yaml_text(**input_fields) -> str:
    """tiny.yaml's text, with `input_fields` added to its `input:` section."""
    with open(TINY_YAML) as f:
        text = f.read()
    added = "".join(f"  {k}: {v}\n" for k, v in input_fields.items())
    return text.replace("  columns:\n", f"{added}  columns:\n")


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

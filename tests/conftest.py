"""Shared fixtures: the tiny CSV fixture's config, and quiet TensorFlow logs."""

import os

import pytest
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tf.Transform's test case reads absl flags (temp dirs); under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()

from support import TINY_YAML  # noqa: E402  (after the flags above)


@pytest.fixture
def tiny_config():
    from schemas.loading import load_config

    return load_config(TINY_YAML)


@pytest.fixture
def write_config(tmp_path):
    """Writes YAML text to a file and returns its path."""

    def write(text: str, name: str = "config.yaml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write

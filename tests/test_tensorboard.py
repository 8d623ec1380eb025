"""`tensorboard --logdir <export dir>` shows every table in the Embedding Projector, with labels.

Starts a real TensorBoard on loopback over an export directory written by `write_table` and reads
the projector plugin's HTTP endpoints (`tensorboard/plugins/projector/projector_plugin.py`): `runs`,
`info` (the projector config of a run), `tensor` (float32 bytes) and `metadata` (the TSV).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from schemas.tables import TableSpec
from trainer.export import write_table
from trainer.tables import escape_key

ITEMS = ["<b>bold</b>", "fish & chips", "tab\there", "naïve ☕", "with space", "<OOV 0>"]
TITLES = ["Bold <b>", "Fish & Chips", "Tab\tTitle", "Naïve Café", 'Say "hi"', ""]
PLUGIN = "/data/plugin/projector"
START_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """Two tables: `hour` (identity, no labels) and `item` (vocabulary, awkward keys, titles as labels)."""
    root = tmp_path_factory.mktemp("run") / "export"
    rng = np.random.default_rng(0)
    tables = {}
    hour = [str(h) for h in range(24)] + ["<OOV>"]
    spec = TableSpec("hour", "identity", ("hour",), len(hour), 2, None, 1)
    tables["hour"] = (hour, rng.normal(size=(len(hour), 2)).astype(np.float32), None)
    spec_item = TableSpec("item", "vocabulary", ("item",), len(ITEMS), 3, len(ITEMS) - 1, 1)
    tables["item"] = (ITEMS, rng.normal(size=(len(ITEMS), 3)).astype(np.float32), TITLES)
    for name, table_spec in (("hour", spec), ("item", spec_item)):
        keys, vectors, labels = tables[name]
        frequency = np.arange(len(keys), 0, -1, dtype=np.int64)
        write_table(str(root / name), table_spec, keys, vectors, frequency, {"output_dir": "run"}, labels)
    return str(root), tables


@pytest.fixture(scope="module")
def tensorboard(export_dir, tmp_path_factory):
    """Base URL of a TensorBoard serving the export directory on 127.0.0.1; stopped afterwards."""
    log_path = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    with open(log_path, "wb") as log:
        # --port 0: the OS picks a free port, TensorBoard prints the URL it serves on.
        process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", export_dir[0], "--host", "127.0.0.1", "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the data server it starts goes with it
        )
    try:
        deadline = time.time() + START_TIMEOUT_S
        url = None
        while url is None:
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/", log_path.read_text(errors="replace"))
            url = match and match.group(1)
            if process.poll() is not None:
                pytest.fail(f"tensorboard exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            if url is None and time.time() > deadline:
                pytest.fail(f"tensorboard did not start in {START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _get(url: str, path: str, **params) -> bytes:
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    with urllib.request.urlopen(url + path + query, timeout=30) as response:
        return response.read()


def _until(fetch, done, timeout=START_TIMEOUT_S):
    """fetch() until done(result): the data loader reads the logdir in the background."""
    deadline = time.time() + timeout
    while True:
        result = fetch()
        if done(result) or time.time() > deadline:
            return result
        time.sleep(0.3)


def test_projector_shows_every_table_with_labels(tensorboard, export_dir):
    _, tables = export_dir
    runs = _until(lambda: json.loads(_get(tensorboard, PLUGIN + "/runs")), lambda r: set(r) >= set(tables))
    assert sorted(runs) == sorted(tables)
    for name, (keys, vectors, labels) in tables.items():
        info = json.loads(_get(tensorboard, PLUGIN + "/info", run=name))
        [embedding] = info["embeddings"]
        assert embedding["tensorName"] == name
        assert [int(n) for n in embedding["tensorShape"]] == [len(keys), vectors.shape[1]]

        tensor = np.frombuffer(_get(tensorboard, PLUGIN + "/tensor", run=name, name=name), dtype=np.float32)
        np.testing.assert_array_equal(tensor.reshape(vectors.shape), vectors)  # every point, bit-exact

        lines = _get(tensorboard, PLUGIN + "/metadata", run=name, name=name).decode("utf-8").split("\n")
        assert lines[-1] == "" and len(lines) == len(keys) + 2  # header, one line per point
        rows = [line.split("\t") for line in lines[1:-1]]
        assert [r[0] for r in rows] == [escape_key(k) for k in keys]
        if labels:
            assert lines[0] == "key\tfrequency\tlabel"
            assert [r[2] for r in rows] == [escape_key(t) for t in labels]
        else:
            assert lines[0] == "key\tfrequency"
    # and the Projector tab is offered at all (the plugin decides that in a background thread)
    plugins = _until(
        lambda: json.loads(_get(tensorboard, "/data/plugins_listing")), lambda p: p["projector"]["enabled"]
    )
    assert plugins["projector"]["enabled"]

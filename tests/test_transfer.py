"""Transfer learning: `init_from` starts a table from an exported one, matched by key.

Config parsing and its errors, the key matching on its own, and one end-to-end pair of runs on
the tiny fixture: the fixture run exports the source tables, and a second run on a different
split (other rows, other row order, some new keys) starts `day_x_hour` from the source frozen and
`carrier` fine-tuned.
"""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from embedpipe import cli, stages
from schemas.config import TableInit
from schemas.errors import ConfigError
from schemas.loading import load_config
from trainer import train
from trainer.tables import load_table, match_rows

from support import FIXTURES, SMALL_CONFIG, TINY_YAML, config_error, edited, own_copy

GOOD = (
    edited(
        SMALL_CONFIG,
        "a_x_b: {columns: [a, b], type: hash, hash_buckets: 32}",
        "a_x_b: {columns: [a, b], type: vocabulary, init_from: {path: runs/src/export/a_x_b}}",
    )
    + "numeric:\n  f: {bucketize: 4}\n"
)


def _source_table(directory, dim: int) -> str:
    """A directory with just the manifest of an exported table (all the config loader reads)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"name": "a_x_b", "kind": "vocabulary", "rows": 9, "dim": dim, "oov_rows": 1}, f)
    return str(directory)


# -- config -----------------------------------------------------------------------------------


def test_init_from_path_is_relative_to_the_config_and_frozen_by_default(write_config, tmp_path):
    config = load_config(write_config(GOOD))
    cross = config.categorical[1]
    assert cross.init_from == TableInit(path=str(tmp_path / "runs" / "src" / "export" / "a_x_b"), trainable=False)
    assert cross.dim == "auto"  # the source does not exist yet: checked when training starts
    assert config.categorical[0].init_from is None
    fine_tuned = load_config(write_config(edited(GOOD, "a_x_b}}", "a_x_b, trainable: true}}")))
    assert fine_tuned.categorical[1].init_from.trainable is True


def test_auto_dim_takes_the_source_tables_dim(write_config, tmp_path):
    _source_table(tmp_path / "runs" / "src" / "export" / "a_x_b", dim=7)
    assert load_config(write_config(GOOD)).categorical[1].dim == 7
    explicit = edited(GOOD, "type: vocabulary, init_from", "type: vocabulary, dim: 7, init_from")
    assert load_config(write_config(explicit)).categorical[1].dim == 7


@pytest.mark.parametrize(
    "old, new, field",
    [
        ("a_x_b}}", "a_x_b, freeze: true}}", "crosses.a_x_b.init_from.freeze: unknown key"),
        ("a_x_b}}", "a_x_b, trainable: yes please}}", "crosses.a_x_b.init_from.trainable: expected true or false"),
        ("{path: runs/src/export/a_x_b}", "{trainable: true}", "crosses.a_x_b.init_from.path: required key is missing"),
        ("{path: runs/src/export/a_x_b}", "runs/src/export/a_x_b", "crosses.a_x_b.init_from: expected a mapping"),
        ("{path: runs/src/export/a_x_b}", "{path: ''}", "crosses.a_x_b.init_from.path: expected a non-empty string"),
        ("f: {bucketize: 4}", "f: {bucketize: 4, init_from: {path: x}}", "numeric.f.init_from: unknown key"),
        (
            "type: vocabulary, init_from",
            "type: vocabulary, dim: 3, init_from",
            "crosses.a_x_b.dim: is 3 but the init_from table",
        ),
    ],
)
def test_bad_init_from_names_the_field(write_config, tmp_path, old, new, field):
    _source_table(tmp_path / "runs" / "src" / "export" / "a_x_b", dim=5)
    assert field in config_error(write_config(edited(GOOD, old, new)))


def test_unreadable_source_manifest_is_a_config_error(write_config, tmp_path):
    source = tmp_path / "runs" / "src" / "export" / "a_x_b"
    source.mkdir(parents=True)
    (source / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="crosses.a_x_b.init_from.path: .* is not an exported table manifest"):
        load_config(write_config(GOOD))


# -- matching ---------------------------------------------------------------------------------


def test_rows_match_by_key_and_oov_rows_by_position():
    source = ["Mon x 8", "Tue x 9", "Wed x 7", "<OOV 0>"]
    new = ["Tue x 9", "Sun x 3", "Mon x 8", "<OOV 0>", "<OOV 1>"]
    match = match_rows(new, 2, source, 1)
    assert dict(zip(match.rows.tolist(), match.source_rows.tolist())) == {0: 1, 2: 0, 3: 3}
    assert (match.matched_keys, match.oov_rows) == (2, 1)
    # identity -> vocabulary: `<OOV>` takes the source's first OOV row; no OOV rows, none copied
    assert match_rows(["0", "1", "<OOV>"], 1, ["1", "7", "<OOV 0>"], 1).source_rows.tolist() == [0, 2]
    assert match_rows(["<hash 0>", "<hash 1>"], 0, ["1", "<OOV 0>"], 1).rows.tolist() == []
    # a real value spelled like an OOV key is not an OOV row
    assert match_rows(["<OOV 0>", "<OOV 1>"], 1, ["x", "<OOV 0>"], 1).source_rows.tolist() == [1]


# -- end to end -------------------------------------------------------------------------------


SECOND = """
name: tiny_transfer
input:
  format: csv
  path: {csv}
  columns: {{delay: float, carrier: string, tail: string, day: string, hour: int, distance: float}}
label: {{column: delay, task: regression, loss: huber}}
split: {{eval_percent: 25, salt: another split}}
categorical:
  carrier: {{type: vocabulary, top_k: 3, oov_buckets: 2, init_from: {{path: {carrier}, trainable: true}}}}
  hour: {{type: identity, num_buckets: 24, dim: 3}}
crosses:
  day_x_hour: {{columns: [day, hour], type: vocabulary, init_from: {{path: {day_x_hour}}}}}
numeric:
  distance: {{normalize: zscore}}
training: {{batch_size: 32, epochs: 2, hidden_units: [8], learning_rate: 0.05}}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(source manifest, second config path, second manifest): the tiny fixture run, then a run
    on another split that starts from its exported tables."""
    root = tmp_path_factory.mktemp("transfer")
    source_out = str(root / "source")
    source = stages.run_all(["--config", TINY_YAML, "--output", source_out, "--run-id", "s1", "--epochs", "2"])
    configs = root / "configs"
    configs.mkdir()
    text = SECOND.format(
        csv=os.path.join(FIXTURES, "tiny.csv"),
        carrier="../source/runs/s1/export/carrier",  # relative to the config file, like input.path
        day_x_hour="../source/LATEST/export/day_x_hour",  # the run ../source/LATEST points at
    )
    config_path = str(configs / "second.yaml")
    with open(config_path, "w") as f:
        f.write(text)
    second = stages.run_all(["--config", config_path, "--output", str(root / "second")])
    return source, config_path, second


def test_frozen_table_keeps_every_matched_source_vector(runs):
    source_manifest, config_path, manifest = runs
    source = load_table(source_manifest["export"]["tables"]["day_x_hour"])
    table = load_table(manifest["export"]["tables"]["day_x_hour"])
    # dim: auto followed the source, found through ../source/LATEST when the tables were sized
    assert load_config(config_path).categorical[2].dim == "auto" and table.dim == source.dim
    matched = [k for k in table.keys[: table.real_rows] if k in source]
    assert matched and any(table.row(k) != source.row(k) for k in matched)  # not a positional copy
    new_keys = [k for k in table.keys[: table.real_rows] if k not in source]
    assert new_keys  # the other split sees cells the source never saw
    for key in matched + ["<OOV 0>"]:
        np.testing.assert_array_equal(table[key], source[key])
    # ... and the whole table, new keys included, is what training started from: it did not move.
    model = keras.models.load_model(os.path.join(manifest["train"]["model_dir"], "model.keras"))
    layer = model.get_layer("day_x_hour_embedding")
    assert not layer.trainable and not layer.trainable_weights

    report = manifest["train"]["transfer"]["day_x_hour"]
    assert report["source"] == source_manifest["export"]["tables"]["day_x_hour"]  # LATEST resolved
    assert report["source_configured"].endswith(os.path.join("source", "LATEST", "export", "day_x_hour"))
    assert report["trainable"] is False
    assert report["rows"] == len(table) and report["matched_keys"] == len(matched)
    assert report["matched_rows"] == len(matched) + 1  # one OOV row on each side
    assert report["match_rate"] == round(report["matched_rows"] / len(table), 4)
    # occurrences: the training rows whose key was matched (OOV rows excluded), from the frequencies
    hits = sum(table.frequencies[table.row(k)] for k in matched)
    assert report["occurrence_match_rate"] == round(hits / table.frequencies.sum(), 4)


def test_fine_tuned_table_starts_from_the_source_and_moves(runs):
    source_manifest, _, manifest = runs
    source = load_table(source_manifest["export"]["tables"]["carrier"])
    table = load_table(manifest["export"]["tables"]["carrier"])
    report = manifest["train"]["transfer"]["carrier"]
    assert report["trainable"] is True and report["rows"] == len(table) == 5  # top_k 3 + 2 OOV rows
    assert report["oov_rows_copied"] == 2 and report["matched_keys"] == 3
    moved = [k for k in table.keys if k in source and not np.array_equal(table[k], source[k])]
    assert moved  # trained: the vectors left their starting point
    model = keras.models.load_model(os.path.join(manifest["train"]["model_dir"], "model.keras"))
    assert model.get_layer("carrier_embedding").trainable
    assert "transfer" not in source_manifest["train"]


def test_missing_source_table_stops_training_naming_the_field(runs, tmp_path, capsys):
    _, config_path, manifest = runs
    broken = os.path.join(os.path.dirname(config_path), "broken.yaml")  # the relative carrier path still holds
    missing = str(tmp_path / "nowhere" / "day_x_hour")
    with open(config_path) as f, open(broken, "w") as g:
        g.write(edited(f.read(), "../source/LATEST/export/day_x_hour", missing))
    out = os.path.dirname(manifest["train"]["model_dir"])
    assert cli.main(["train", "--config", broken, "--output", out, "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{broken}: crosses.day_x_hour.init_from.path: no exported table at {missing}" in err


def test_source_dim_is_checked_again_when_training_starts(runs):
    """A config loaded before the source table existed keeps `auto`'s rule; training then
    refuses a source of another dim instead of copying a slice of it."""
    _, config_path, manifest = runs
    config = load_config(config_path)
    cross = config.categorical[2]
    source_dim = load_table(cross.init_from.path).dim
    other = dataclasses.replace(cross, dim=source_dim + 1)
    config = dataclasses.replace(config, categorical=config.categorical[:2] + (other,))
    expected = (
        rf"crosses.day_x_hour.dim: the table has dim {source_dim + 1} but the init_from table .* has dim {source_dim}"
    )
    with pytest.raises(ConfigError, match=expected):
        train.train(config, os.path.dirname(manifest["train"]["model_dir"]), epochs=1)


def test_baseline_has_no_tables_to_start(runs, tmp_path):
    _, config_path, manifest = runs
    out = own_copy(os.path.dirname(manifest["train"]["model_dir"]), tmp_path)
    section = train.train(load_config(config_path), out, baseline=True, epochs=1)
    assert section["tables"] == {} and "transfer" not in section

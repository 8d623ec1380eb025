"""All three stages on the tiny fixture through the `embedpipe run` entry point."""

import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from embedpipe import cli, runs, stages
from pipeline import rows
from schemas import layout
from schemas.config import auto_embedding_dim
from trainer.report import write_report
from trainer.tables import load_table

from support import TINY_YAML, own_copy


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    config = TINY_YAML
    manifest = stages.run_all(["--config", config, "--output", out, "--run-id", "r1", "--epochs", "2"])
    return out, manifest


def test_every_input_row_is_accounted_for(run_dir):
    out, manifest = run_dir
    counts = manifest["preprocess"]["rows"]
    assert counts["read"] == 244
    assert counts["train"] + counts["eval"] == 240 and counts["eval"] > 0
    assert counts["dead_letter_by_reason"] == {
        rows.BAD_FLOAT: 1,
        rows.EMPTY_LINE: 1,
        rows.MALFORMED_CSV: 1,
        rows.MISSING_VALUE: 1,
    }
    letters = [
        json.loads(line) for f in glob.glob(manifest["preprocess"]["outputs"]["dead_letter"]) for line in open(f)
    ]
    assert sorted(d["reason"] for d in letters) == sorted(counts["dead_letter_by_reason"])
    assert all(d["source"].endswith("tiny.csv") for d in letters)
    assert manifest["preprocess"]["config"]["sha256"]
    assert set(manifest["preprocess"]["timings_s"]) == {"preprocess"}
    assert manifest["package_versions"]["tensorflow-transform"].startswith("1.")


def test_exported_tables_have_the_right_keys_and_shapes(run_dir):
    out, manifest = run_dir
    train_rows = manifest["preprocess"]["rows"]["train"]
    tables = {name: load_table(path) for name, path in manifest["export"]["tables"].items()}
    assert sorted(tables) == sorted(["carrier", "tail", "hour", "day_x_hour", "day_x_carrier", "distance_bucket"])

    carrier = tables["carrier"]  # top_k 4 of 5 carriers, 2 OOV rows
    assert len(carrier) == 6 and carrier.keys[0] == "AA" and carrier.keys[-2:] == ["<OOV 0>", "<OOV 1>"]
    assert carrier.dim == auto_embedding_dim(6) and carrier.frequencies.sum() == train_rows

    hour = tables["hour"]
    assert hour.keys == [str(h) for h in range(24)] + ["<OOV>"] and hour.vectors.shape == (25, 3)

    cross = tables["day_x_hour"]
    assert all(
        k.startswith("<OOV") or (k.split(" x ")[0] in {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"})
        for k in cross.keys
    )
    assert cross.dim == auto_embedding_dim(len(cross)) and cross.frequencies.sum() == train_rows
    assert tables["day_x_carrier"].keys[3] == "<hash 3>" and len(tables["day_x_carrier"]) == 16
    assert tables["distance_bucket"].vectors.shape[0] == 4

    model = keras.models.load_model(os.path.join(manifest["train"]["model_dir"], "model.keras"))
    np.testing.assert_array_equal(model.get_layer("hour_embedding").get_weights()[0], hour.vectors)


def test_serving_model_takes_raw_features(run_dir):
    out, manifest = run_dir
    serving = tf.saved_model.load(os.path.join(manifest["train"]["model_dir"], "serving"))
    raw = {
        "carrier": tf.constant(["AA", "UA", "never-seen"]),
        "tail": tf.constant(["N001", "N002", "N999"]),
        "day": tf.constant(["Mon", "Fri", "Sun"]),
        "hour": tf.constant([5, 18, 99], tf.int64),
        "distance": tf.constant([300.0, 1500.0, 50.0]),
    }
    prediction = serving.signatures["serving_default"](**raw)["prediction"].numpy()
    assert prediction.shape == (3, 1) and np.isfinite(prediction).all()
    assert manifest["train"]["headline_metric"]["name"] == "mae"


def _day_hour_cosines(table) -> tuple[float, float]:
    """Mean cosine of (same hour, other day) pairs and of (same day, 6+ hours apart) pairs."""
    cells = [(k.split(" x ")[0], int(k.split(" x ")[1]), table.vector(k)) for k in table.keys if " x " in k]
    unit = np.array([v / np.linalg.norm(v) for _, _, v in cells])
    cosine = unit @ unit.T
    same_hour, far = [], []
    for i, (day, hour, _) in enumerate(cells):
        for j, (other_day, other_hour, _) in enumerate(cells):
            if hour == other_hour and day != other_day:
                same_hour.append(cosine[i, j])
            elif day == other_day and abs(hour - other_hour) >= 6:
                far.append(cosine[i, j])
    return float(np.mean(same_hour)), float(np.mean(far))


def test_bundled_sample_main_job(tmp_path, monkeypatch, capsys):
    """`embedpipe run` with no arguments, as the README says (writes under the working dir): the
    day x hour table puts the same hour of other days together and far hours apart, the model
    beats the numeric-only baseline, and the summary shows both and the report."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run"]) == 0
    out = capsys.readouterr().out.splitlines()
    root = tmp_path / "embedpipe_output" / "departures"
    manifest = json.load(open(os.path.join(layout.latest(str(root)), "manifest.json")))
    counts = manifest["preprocess"]["rows"]
    assert counts["read"] == 20000 and counts["train"] + counts["eval"] + counts["dead_letter"] == 20000
    # the cancelled and diverted flights: no arrival delay, so no label
    assert counts["dead_letter_by_reason"] == {rows.MISSING_VALUE: counts["dead_letter"]} and counts["dead_letter"]
    model, baseline = manifest["train"]["headline_metric"], manifest["baseline"]["headline_metric"]
    assert model["name"] == baseline["name"] == "auc" and model["value"] > baseline["value"] + 0.05
    same_hour, far = _day_hour_cosines(load_table(str(root / "LATEST" / "export" / "dow_x_hour")))
    assert same_hour - far > 0.3, (same_hour, far)
    shown = out.index("  neighbours in dow_x_hour (cosine):")
    assert [len(line.split(" ~ ")[1].split(", ")) for line in out[shown + 1 : shown + 3]] == [5, 5]
    assert out[shown + 3].startswith(f"  eval auc: {model['value']:.4f}  vs. {baseline['value']:.4f}")
    assert out[-1].startswith("  report:") and os.path.getsize(out[-1].split()[-1]) > 10_000


def test_a_run_is_published_and_rerunning_its_id_is_idempotent(run_dir, capsys, tmp_path):
    base, manifest = run_dir
    assert layout.latest(base) == os.path.join(base, "runs", "r1") and layout.is_complete(layout.latest(base))
    assert manifest["export"]["tables"]["hour"].startswith(os.path.join(base, "runs", "r1"))
    # downstream code reads "latest" through the pointer
    hour = load_table(os.path.join(base, "LATEST", "export", "hour"))
    np.testing.assert_array_equal(hour.vectors, load_table(manifest["export"]["tables"]["hour"]).vectors)
    out = own_copy(base, tmp_path)
    again = stages.run_all(["--config", TINY_YAML, "--output", out, "--run-id", "r1", "--epochs", "2"])
    assert "already complete" in capsys.readouterr().out and again == manifest
    with pytest.raises(layout.RunError, match="complete run made with another config"):
        stages.run_all(["--config", TINY_YAML, "--input", "elsewhere.csv", "--output", out, "--run-id", "r1"])
    with pytest.raises(layout.RunError, match="not a finished run"):
        os.makedirs(os.path.join(out, "runs", "half"))
        runs.publish(out, "half")
    assert layout.latest(out) == os.path.join(out, "runs", "r1")


def test_the_same_input_config_and_seed_give_identical_outputs(run_dir, tmp_path):
    base, manifest = run_dir
    out = own_copy(base, tmp_path)
    again = stages.run_all(["--config", TINY_YAML, "--output", out, "--run-id", "r2", "--epochs", "2"])
    first, second = (
        os.path.join(root, "runs", r, "preprocess", "transform", "transform_fn", "assets")
        for root, r in ((base, "r1"), (out, "r2"))
    )
    assert sorted(os.listdir(first)) == sorted(os.listdir(second)) == ["carrier", "day_x_hour"]
    for name in os.listdir(first):
        assert open(os.path.join(first, name), "rb").read() == open(os.path.join(second, name), "rb").read()
    for name, path in manifest["export"]["tables"].items():
        a, b = load_table(path), load_table(again["export"]["tables"][name])
        assert a.keys == b.keys
        np.testing.assert_array_equal(a.vectors, b.vectors)  # bitwise
    assert again["preprocess"]["rows"] == manifest["preprocess"]["rows"]


def test_warm_start_begins_from_the_published_tables_by_key(run_dir, tmp_path):
    out = own_copy(run_dir[0], tmp_path)
    previous = layout.latest(out)
    warm = stages.run_all(["--config", TINY_YAML, "--output", out, "--run-id", "w1", "--warm-start", "--epochs", "1"])
    transfer = warm["train"]["transfer"]
    assert set(transfer) == {"carrier", "tail", "hour", "day_x_hour", "day_x_carrier"}  # bucket tables have no init
    for name, entry in transfer.items():
        assert entry["source"] == os.path.join(previous, "export", name) and entry["trainable"] is True
        assert entry["match_rate"] == 1.0  # same data: every key was there yesterday
        assert load_table(warm["export"]["tables"][name]).dim == load_table(entry["source"]).dim
    assert layout.latest(out) == os.path.join(out, "runs", "w1")
    drift = warm["drift"]  # compared with the run it replaced before publishing
    assert drift["against"] == previous and drift["tables"]["carrier"]["keys_added"] == 0
    assert (
        drift["tables"]["day_x_hour"]["new_key_traffic"] == 0 and drift["tables"]["day_x_hour"]["neighbor_overlap"] > 0
    )
    assert "Drift since the last published run" in open(write_report(layout.latest(out))).read()

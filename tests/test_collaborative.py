"""Collaborative embeddings end to end on a small synthetic watch log with planted genres."""

import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from embedpipe import stages
from pipeline import synthetic
from pipeline.collaborative import TemporalHoldout
from pipeline.preprocess import LOCAL_RUNNER
from pipeline.transforms import EVAL, TRAIN
from schemas.loading import load_config
from trainer.retrieval import BagOfHistory
from trainer.tables import load_table

from support import TINY_WATCH_YAML, own_copy

with open(TINY_WATCH_YAML) as _f:
    CONFIG = _f.read()


def test_temporal_holdout_keeps_the_future_out_of_training(write_config):
    config = load_config(write_config(CONFIG))
    events = [(30, "c", 1.0), (10, "a", 1.0), (40, "d", 1.0), (20, "b", 1.0)]
    with TestPipeline(runner=LOCAL_RUNNER) as p:
        split = p | beam.Create([("u1", events), ("u2", [(5, "a", 1.0), (6, "b", 1.0)])]) | TemporalHoldout(config)
        assert_that(
            split[TRAIN] | "T" >> beam.Map(lambda e: (e["user"][0], e["targets"][0], tuple(e["history"]))),
            equal_to([("u1", "a", ()), ("u1", "b", ("a",)), ("u2", "a", ()), ("u2", "b", ("a",))]),
            label="Train",
        )
        # u1's last two watches are held out; u2 has only 2 and stays wholly in training.
        assert_that(
            split[EVAL] | "E" >> beam.Map(lambda e: (e["user"][0], tuple(e["targets"]), tuple(e["seen"]))),
            equal_to([("u1", ("c", "d"), ("a", "b"))]),
            label="Eval",
        )


@pytest.fixture(scope="module")
def watch_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    logs = synthetic.generate_watch_logs(num_users=500, num_items=300, num_groups=6, mean_interactions=30, seed=3)
    synthetic.write_watch_logs(logs, str(root))
    (root / "tiny_watch.yaml").write_text(CONFIG)
    out = str(root / "out")
    manifest = stages.run_all(["--config", str(root / "tiny_watch.yaml"), "--output", out, "--run-id", "w1"])
    return logs, manifest, out


def test_every_interaction_is_train_or_holdout(watch_run):
    logs, manifest, _ = watch_run
    rows = manifest["preprocess"]["rows"]
    assert rows["read"] == logs.interactions.num_rows == rows["train"] + rows["eval"] + rows["dead_letter"]
    assert rows["dead_letter"] == 0 and rows["eval"] == 2 * manifest["preprocess"]["users_evaluated"]


def test_models_beat_popularity_and_neighbours_share_the_planted_group(watch_run):
    logs, manifest, out = watch_run
    metrics = manifest["train"]["eval_metrics"]
    popularity = metrics["popularity"]["recall@20"]
    for model in ("two_tower", "bag_of_history"):
        assert metrics[model]["recall@20"] > 1.25 * popularity, metrics
    assert manifest["train"]["headline_metric"]["value"] > 1.5 * popularity, metrics
    item = load_table(manifest["export"]["tables"]["item"])
    assert item.dim == 8 and item.keys[-1] == "<OOV 0>"
    group = {f"m{i:06d}": g for i, g in enumerate(logs.item_group)}
    real = [i for i, k in enumerate(item.keys) if k in group]
    unit = item.vectors[real] / np.linalg.norm(item.vectors[real], axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1)[:, :5]
    same = np.mean(
        [group[item.keys[real[j]]] == group[item.keys[real[i]]] for i in range(len(real)) for j in nearest[i]]
    )
    assert same > 0.6, same  # chance is 1/6 with 6 groups
    metadata = open(os.path.join(manifest["export"]["tables"]["item"], "metadata.tsv")).read().splitlines()
    assert metadata[0] == "key\tfrequency\tlabel" and metadata[1].split("\t")[2].startswith("Group ")
    assert json.load(open(os.path.join(out, "runs", "w1", "manifest.json")))["train"]["best_model"] in (
        "two_tower",
        "bag_of_history",
    )
    weights = manifest["train"]["history_weights"]["bag_of_history"]
    assert len(weights) == 3 and weights[0] == 1.0 and all(w > 0 for w in weights)


def test_bag_of_history_pools_by_position_from_the_end():
    import tensorflow as tf

    model = BagOfHistory(items=10, item_dim=3, max_history=4)
    history = tf.ragged.constant([[1, 2, 3, 4, 5], [], [7]], dtype=tf.int64)
    query = model.query(None, history).numpy()
    table = model.item_table.embeddings.numpy()
    # untrained: a plain mean of the last max_history items; an empty history gives zeros
    np.testing.assert_allclose(query[0], table[[2, 3, 4, 5]].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(query[1], 0.0)
    np.testing.assert_allclose(query[2], table[7], rtol=1e-6)
    model.recency.assign([np.log(3.0), 0.0, 0.0, 0.0])  # the newest item counts three times
    expected = (table[[2, 3, 4]].sum(axis=0) + 3 * table[5]) / 6
    np.testing.assert_allclose(model.query(None, history).numpy()[0], expected, rtol=1e-6)
    assert model.history_weights() == [1.0, 0.3333, 0.3333, 0.3333]


def test_warm_start_of_a_collaborative_run(watch_run, tmp_path):
    logs, manifest, base = watch_run
    config = os.path.join(os.path.dirname(base), "tiny_watch.yaml")
    out = own_copy(base, tmp_path)
    warm = stages.run_all(["--config", config, "--output", out, "--run-id", "w2", "--warm-start", "--epochs", "1"])
    report = warm["train"]["warm_start"]
    best = manifest["train"]["best_model"]
    assert report[best]["item"]["source"] == os.path.join(out, "runs", "w1", "export", "item")
    assert report[best]["item"]["match_rate"] == 1.0
    assert load_table(warm["export"]["tables"]["item"]).dim == 8

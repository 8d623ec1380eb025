"""Collaborative embeddings: the per-user records of the Beam job, the trainer's pairs and
rankings, and one end-to-end run on a small synthetic watch log with planted genres."""

import dataclasses
import gc
import json
import os
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from embedpipe import cli, stages
from pipeline import collaborative, synthetic
from pipeline.preprocess import LOCAL_RUNNER
from pipeline.transforms import EVAL, TRAIN
from schemas import layout
from schemas.loading import load_config
from schemas.tables import TableSpec, table_specs
from trainer import recommender, retrieval, sequences
from trainer.export import export as export_stage
from trainer.ranking import SEEN, PopularityTopK, RankingMetrics, TopK
from trainer.retrieval import BagOfHistory
from trainer.tables import load_table

from support import TINY_WATCH_YAML, own_copy

with open(TINY_WATCH_YAML) as _f:
    CONFIG = _f.read()


def _interactions(events) -> pa.Table:
    users, items, ts = zip(*events)
    return pa.table({"user": list(users), "item": list(items), "ts": list(ts)})


def _packed(events) -> bytes:
    return collaborative.pack(_interactions(events))


def _rows(records: pa.RecordBatch) -> list[tuple]:
    """(user, items, start, last, targets) of each record, keys as text."""

    def text(values):
        return tuple(v.decode() if isinstance(v, bytes) else v for v in values)

    return [
        (r["user"][0].decode(), text(r["items"]), r["start"][0], r["last"][0], text(r["targets"]))
        for r in records.to_pylist()
    ]


# -- the Beam job -----------------------------------------------------------------------------


def test_user_sequences_keep_the_future_out_of_training(write_config):
    config = load_config(write_config(CONFIG))  # holdout 2, max_history 3
    u1 = [("u1", "c", 30), ("u1", "a", 10), ("u1", "d", 40), ("u1", "b", 20), ("u1", "e", 50)]
    u2 = [("u2", "a", 5), ("u2", "b", 6)]
    with TestPipeline(runner=LOCAL_RUNNER) as p:
        records = (
            p
            | beam.Create([(0, [_packed(u1[:3]), _packed(u1[3:])]), (1, [_packed(u2)])])
            | collaborative.UserSequences(config)
        )
        # every train record is the user's training interactions in time order, targets from 0
        assert_that(
            records[TRAIN] | "T" >> beam.FlatMap(_rows),
            equal_to([("u1", ("a", "b", "c"), 0, 1, ()), ("u2", ("a", "b"), 0, 1, ())]),
            label="Train",
        )
        # u1's last two watches are held out; u2 has only 2 and stays wholly in training.
        assert_that(
            records[EVAL] | "E" >> beam.FlatMap(_rows),
            equal_to([("u1", ("a", "b", "c"), 3, 1, ("d", "e"))]),
            label="Eval",
        )


def test_a_long_history_is_cut_into_chunks_after_their_context():
    events = [("u", f"i{t:02d}", t) for t in range(23)]
    train, evaluation, counts = collaborative.sequence_records(
        _interactions(events), holdout=3, max_history=4, weighted=False, max_items=6
    )
    chunks = _rows(train)
    assert [len(c[1]) - c[2] for c in chunks] == [6, 6, 6, 2]  # targets per chunk: 20 training interactions
    assert [c[2] for c in chunks] == [0, 4, 4, 4] and [c[3] for c in chunks] == [0, 0, 0, 1]
    targets = [item for user, items, start, last, _ in chunks for item in items[start:]]
    assert targets == [f"i{t:02d}" for t in range(20)]  # each exactly once, in order
    assert chunks[1][1][:4] == ("i02", "i03", "i04", "i05")  # context: the 4 items before the chunk
    assert _rows(evaluation) == [("u", tuple(f"i{t:02d}" for t in range(14, 20)), 6, 1, ("i20", "i21", "i22"))]
    assert counts == {"train": 20, "eval": 3, "users_evaluated": 1}


def test_ties_in_time_are_broken_by_item():
    events = [("u", "b", 1), ("u", "a", 1), ("u", "c", 0), ("u", "d", 2)]
    train, evaluation, _ = collaborative.sequence_records(
        _interactions(events), holdout=1, max_history=5, weighted=False
    )
    assert _rows(train) == [("u", ("c", "a", "b"), 0, 1, ())] and _rows(evaluation)[0][4] == ("d",)


@pytest.mark.parametrize("weighted", [False, True])
def test_keying_sends_every_interaction_of_a_user_to_one_bucket(write_config, weighted):
    text = CONFIG.replace("  timestamp: ts\n", "  timestamp: ts\n  weight: rating\n") if weighted else CONFIG
    config = load_config(write_config(text))
    users = [f"u{i % 37}" for i in range(500)]
    batch = pa.RecordBatch.from_pydict(
        {
            "user": pa.array([[u.encode()] for u in users], pa.large_list(pa.large_binary())),
            "item": pa.array([[f"m{i}".encode()] for i in range(500)], pa.large_list(pa.large_binary())),
            "ts": pa.array([[i] for i in range(500)], pa.large_list(pa.int64())),
            "rating": pa.array([[i / 4] for i in range(500)], pa.large_list(pa.float32())),
        }
    )
    parts = list(collaborative._by_bucket(batch, config, buckets=8))
    bucket_of = {}
    tables = [(bucket, collaborative.unpack(data)) for bucket, data in parts]
    assert sum(t.num_rows for _, t in tables) == 500 and len({k for k, _ in parts}) == len(parts) <= 8
    # the packed slices keep every column the records need, and a weight only when configured
    assert tables[0][1].column_names == ["user", "item", "ts"] + (["weight"] if weighted else [])
    if weighted:
        rows = pa.concat_tables([t for _, t in tables]).sort_by("ts")
        assert rows.column("weight").to_pylist() == [i / 4 for i in range(500)]
    for bucket, table in tables:
        for user in table.column("user").to_pylist():
            assert bucket_of.setdefault(user, bucket) == bucket


# -- the trainer's input and rankings -------------------------------------------------------


def _records(items: list[list[int]], start: list[int], last: list[int], users=None) -> dict:
    return {
        "user": tf.constant(users or list(range(len(items))), tf.int64),
        "items": tf.ragged.constant(items, dtype=tf.int64, row_splits_dtype=tf.int64),
        "start": tf.constant(start, tf.int64),
        "last": tf.constant(last, tf.int64),
    }


def test_pairs_are_every_target_with_the_items_before_it():
    records = _records([[5, 6, 7, 8], [1, 2, 3]], start=[0, 2], last=[1, 0])  # record 1: two context items
    pairs = sequences._pairs(records, 2, sequences.Validation(0.0, 1), False, tf.constant([0, 0], tf.int64))
    got = sorted(
        (int(t), tuple(int(h) for h in history), bool(has))
        for t, history, has in zip(pairs["target"].numpy(), pairs["history"].numpy(), pairs["has_history"].numpy())
    )
    assert got == [(3, (1, 2), True), (5, (-1, -1), False), (6, (-1, 5), True), (7, (5, 6), True), (8, (6, 7), True)]
    # with every user in the validation slice, the last target of each last record is left out
    held = sequences._pairs(records, 2, sequences.Validation(1.0, 1), False, tf.constant([0, 0], tf.int64))
    assert sorted(held["target"].numpy().tolist()) == [3, 5, 6, 7]


def _chunk_pairs(batch: dict, chunk: int) -> list[tuple]:
    """(user, target, history window, has_history, weight) of each real target of a chunk batch,
    the window read off the chunk's sequence."""
    sequence, valid = batch["sequence"].numpy(), batch["valid"].numpy()
    history = sequence.shape[1] - chunk
    return [
        (
            int(batch["user"][i]),
            int(batch["target"][i]),
            tuple(sequence[i // chunk, i % chunk : i % chunk + history].tolist()),
            bool(batch["has_history"][i]),
            float(batch["weight"][i]),
        )
        for i in np.flatnonzero(valid)
    ]


def test_chunks_are_every_target_with_the_items_before_it_read_once():
    records = _records([[5, 6, 7, 8, 9], [1, 2, 3]], start=[0, 2], last=[1, 0])
    chunks = sequences._chunks(records, 2, 2, sequences.Validation(0.0, 1), False, tf.constant([0, 0], tf.int64))
    got = sorted(
        (tuple(s), tuple(t), tuple(v))
        for s, t, v in zip(*(chunks[k].numpy().tolist() for k in ("sequence", "target", "valid")))
    )
    # record 0: targets 5 6 | 7 8 | 9; record 1: its two context items, then target 3
    assert got == [
        ((-1, -1, 5, 6), (5, 6), (True, True)),
        ((1, 2, 3, -1), (3, 0), (True, False)),
        ((5, 6, 7, 8), (7, 8), (True, True)),
        ((7, 8, 9, -1), (9, 0), (True, False)),
    ]
    # a held-out validation target is neither a target nor read as anyone's history
    held = sequences._chunks(records, 2, 2, sequences.Validation(1.0, 1), False, tf.constant([0, 0], tf.int64))
    assert 9 not in held["sequence"].numpy() and 9 not in held["target"].numpy()
    assert sorted(held["target"].numpy()[held["valid"].numpy()].tolist()) == [3, 5, 6, 7, 8]


def test_a_chunks_queries_are_the_queries_of_its_targets_windows():
    model = BagOfHistory(items=20, item_dim=3, max_history=4)
    model.recency.assign([0.9, 0.1, -0.5, 0.3])
    sequence = tf.constant([[-1, -1, -1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, -1], [-1] * 7], tf.int64)  # chunk 3
    queries, targets = model.sequence_queries(sequence, 3)
    windows = tf.constant([sequence.numpy()[c, i : i + 4] for c in range(3) for i in range(3)])
    np.testing.assert_allclose(queries.numpy(), model.query(None, windows).numpy(), rtol=1e-6, atol=1e-7)
    rows = sequence.numpy()[:, 4:].reshape(-1)
    table = model.item_table.embeddings.numpy()
    expected = np.where((rows >= 0)[:, None], table[np.maximum(rows, 0)], 0.0)
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-6)
    # the gradient reaches only real items' rows
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(queries * 0) + tf.reduce_sum(model.sequence_queries(sequence, 3)[0])
    gradient = tape.gradient(loss, model.item_table.embeddings)
    assert sorted(set(gradient.indices.numpy().tolist())) == list(range(2, 12))


def test_same_user_targets_are_no_negatives_for_each_other():
    query = tf.constant(np.eye(4, 3, dtype=np.float32))
    targets, log_q, weights = tf.constant([0, 1, 2, 3], tf.int64), tf.zeros([4]), tf.ones([4])
    by_user = retrieval.in_batch_softmax_loss(
        query, query, targets, log_q, weights, users=tf.constant([7, 7, 8, 8], tf.int64)
    )
    logits = query.numpy() @ query.numpy().T
    own = [[0, 2, 3], [1, 2, 3], [2, 0, 1], [3, 0, 1]]  # each target among the other user's only
    expected = np.mean([np.log(np.exp(logits[i, cols]).sum()) - logits[i, i] for i, cols in enumerate(own)])
    assert float(by_user) == pytest.approx(expected, rel=1e-5)
    assert float(by_user) != pytest.approx(
        float(retrieval.in_batch_softmax_loss(query, query, targets, log_q, weights))
    )


def test_the_losss_own_gradient_is_autodiffs():
    rng = np.random.default_rng(5)
    query, candidates = (tf.constant(rng.normal(size=(6, 3)).astype(np.float32)) for _ in range(2))
    targets = tf.constant([0, 1, 1, 2, 3, 4], tf.int64)  # an accidental hit
    log_q, weights = tf.constant(np.log(rng.random(5)).astype(np.float32)), tf.constant([1.0, 2.0, 1.0, 0.5, 0.0, 1.0])
    valid = tf.constant([True] * 5 + [False])

    def reference(q, c):  # the same loss through autodiff of TensorFlow's cross-entropy
        logits = tf.matmul(q, c, transpose_b=True) - tf.gather(log_q, targets)[None, :]
        masked = (tf.equal(targets[:, None], targets[None, :]) & ~tf.eye(6, dtype=tf.bool)) | ~valid[None, :]
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.range(6), tf.where(masked, -1e9, logits))
        return tf.reduce_sum(losses * weights) / tf.reduce_sum(weights)

    results = []
    for loss in (reference, lambda q, c: retrieval.in_batch_softmax_loss(q, c, targets, log_q, weights, valid)):
        with tf.GradientTape() as tape:
            tape.watch([query, candidates])
            value = loss(query, candidates)
        results.append([value, *tape.gradient(value, [query, candidates])])
    for want, got in zip(*results):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_batches_are_one_size_and_padding_is_no_ones_negative():
    pool = {"target": tf.range(5, dtype=tf.int64), "weight": tf.ones([5]), "history": tf.zeros([5, 2], tf.int64)}
    pool.update(user=tf.zeros([5], tf.int64), has_history=tf.ones([5], tf.bool))
    batches = list(sequences._batches(pool, 4))
    assert [b["target"].shape[0] for b in batches] == [4, 4]
    assert batches[1]["valid"].numpy().tolist() == [True, False, False, False] and float(batches[1]["weight"][1]) == 0
    query = tf.constant(np.eye(4, 3, dtype=np.float32))
    loss = retrieval.in_batch_softmax_loss(
        query, query, tf.constant([0, 1, 2, 3], tf.int64), tf.zeros([4]), tf.ones([4])
    )
    padded = retrieval.in_batch_softmax_loss(
        query,
        query,
        tf.constant([0, 1, 2, 3], tf.int64),
        tf.zeros([4]),
        tf.constant([1.0, 1.0, 0.0, 0.0]),
        tf.constant([True, True, False, False]),
    )
    alone = retrieval.in_batch_softmax_loss(
        query[:2], query[:2], tf.constant([0, 1], tf.int64), tf.zeros([4]), tf.ones([2])
    )
    assert float(padded) == pytest.approx(float(alone)) and float(loss) != pytest.approx(float(alone))


def test_exact_top_k_skips_seen_items_in_every_chunk():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(2500, 6)).astype(np.float32)  # three chunks, the last one short
    query = rng.normal(size=(7, 6)).astype(np.float32)
    seen = [list(rng.choice(2500, size=n, replace=False)) for n in (0, 3, 40, 1, 200, 5, 2499)]
    scores = query @ items.T
    for row, s in enumerate(seen):
        scores[row, s] = SEEN
    top, values = TopK(items)(tf.constant(query), tf.ragged.constant(seen, dtype=tf.int64), 10)
    np.testing.assert_allclose(values, -np.sort(-scores, axis=1)[:, :10], rtol=1e-5)
    assert all(not set(top[r]) & set(seen[r]) for r in range(6)) and (top < 2500).all()
    assert values[6, 0] > SEEN and (values[6, 1:] == SEEN).all()  # the last user has seen all but one
    popularity, _ = PopularityTopK(np.arange(2500, 0, -1))(
        tf.zeros([7, 1]), tf.ragged.constant(seen, dtype=tf.int64), 10
    )
    assert popularity[0].tolist() == list(range(10)) and not set(popularity[4]) & set(seen[4])


def test_recall_and_ndcg_count_distinct_targets_and_misses():
    metrics = RankingMetrics([1, 3])
    top = np.array([[4, 5, 6], [1, 2, 3]])
    metrics.add(top, tf.ragged.constant([[5, 5, 9], [7]], dtype=tf.int64))  # 9 and 7 never ranked: misses
    result = metrics.result()
    assert result["recall@1"] == 0.0 and result["recall@3"] == pytest.approx((1 / 2 + 0) / 2)
    ideal = 1 + 1 / np.log2(3)
    assert result["ndcg@3"] == pytest.approx((1 / np.log2(3)) / ideal / 2)


def test_bag_of_history_pools_by_position_from_the_end():
    model = BagOfHistory(items=10, item_dim=3, max_history=4)
    history = tf.constant([[2, 3, 4, 5], [-1, -1, -1, -1], [-1, -1, -1, 7]], tf.int64)  # right-aligned
    query = model.query(None, history).numpy()
    table = model.item_table.embeddings.numpy()
    # untrained: a plain mean of the history; an empty history gives zeros
    np.testing.assert_allclose(query[0], table[[2, 3, 4, 5]].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(query[1], 0.0)
    np.testing.assert_allclose(query[2], table[7], rtol=1e-6)
    model.recency.assign([np.log(3.0), 0.0, 0.0, 0.0])  # the newest item counts three times
    expected = (table[[2, 3, 4]].sum(axis=0) + 3 * table[5]) / 6
    np.testing.assert_allclose(model.query(None, history).numpy()[0], expected, rtol=1e-6)
    assert model.history_weights() == [1.0, 0.3333, 0.3333, 0.3333]


# -- end to end -------------------------------------------------------------------------------


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
    logs, manifest, out = watch_run
    rows = manifest["preprocess"]["rows"]
    assert rows["read"] == logs.interactions.num_rows == rows["train"] + rows["eval"] + rows["dead_letter"]
    assert rows["dead_letter"] == 0 and rows["eval"] == 2 * manifest["preprocess"]["users_evaluated"]
    counts = json.load(open(os.path.join(out, "runs", "w1", "preprocess", "id_counts.json")))
    assert sum(counts["item"].values()) == sum(counts["user"].values()) == rows["train"]
    assert (
        len([f for f in os.listdir(os.path.join(out, "runs", "w1", "preprocess", "data")) if f.startswith("train-")])
        > 1
    )


def test_models_beat_popularity_and_neighbours_share_the_planted_group(watch_run):
    logs, manifest, out = watch_run
    train = manifest["train"]
    metrics = train["eval_metrics"]
    popularity = metrics["popularity"]["recall@20"]
    for model in ("two_tower", "bag_of_history"):
        assert metrics[model]["recall@20"] > 1.25 * popularity, metrics
    assert train["headline_metric"]["value"] > 1.5 * popularity, metrics
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
    weights = train["history_weights"]["bag_of_history"]
    assert len(weights) == 3 and weights[0] == 1.0 and all(w > 0 for w in weights)


def test_the_exported_model_is_chosen_on_validation_not_on_the_test_holdout(watch_run):
    _, manifest, _ = watch_run
    train = manifest["train"]
    validated = train["validation_metrics"]
    assert train["chosen_on"] == "validation" and set(validated) == {"two_tower", "bag_of_history"} and train["refit"]
    assert train["best_model"] == max(validated, key=lambda m: validated[m]["recall@20"])
    for model, curve in train["validation_curves"].items():
        best = train["best_epochs"][model]
        assert 1 <= best <= len(curve) <= 8 and curve[best - 1] == max(curve)
        assert validated[model]["recall@20"] == curve[best - 1]
        assert len(train["epoch_losses"][model]) == len(curve)
    assert train["evaluation"] == {
        "users": 500, "users_total": 500, "sampled": False, "validation_share": 1.0, "validation_holdout": 2,
    }  # fmt: skip


def test_evaluation_on_a_sample_of_users_says_so(watch_run, tmp_path):
    _, manifest, base = watch_run
    run = os.path.join(own_copy(base, tmp_path), "runs", "w1")
    config = load_config(manifest["preprocess"]["config"]["path"])
    config = dataclasses.replace(
        config,
        evaluation=dataclasses.replace(config.evaluation, users=120),
        training=dataclasses.replace(config.training, epochs=1, models=("two_tower",)),
    )
    section = retrieval.train(config, run)
    assert section["evaluation"]["sampled"] is True and section["evaluation"]["users_total"] == 500
    assert 60 < section["evaluation"]["users"] < 200


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


def test_ids_of_a_chunked_record_count_each_interaction_once():
    batch = pa.RecordBatch.from_pydict(
        {
            "user": pa.array([[0], [0], [1]], pa.large_list(pa.int64())),
            "start": pa.array([[0], [2], [0]], pa.large_list(pa.int64())),
            "items": pa.array([[5, 6, 7], [6, 7, 8], [5]], pa.large_list(pa.int64())),
        }
    )
    counts = collaborative.count_sequence_ids(batch, "user", "item")
    assert dict(zip(*(a.tolist() for a in counts["item"]))) == {5: 2, 6: 1, 7: 1, 8: 1}
    assert dict(zip(*(a.tolist() for a in counts["user"]))) == {0: 4, 1: 1}
    assert pc.sum(pa.array(counts["user"][1])).as_py() == 5


# -- recommendations --------------------------------------------------------------------------


def test_every_user_gets_recommendations_without_their_history(watch_run, tmp_path, capsys):
    logs, manifest, base = watch_run
    root = own_copy(base, tmp_path)
    export = os.path.join(root, "runs", "w1", "export")
    users = load_table(os.path.join(export, "user"))
    histories = pq.read_table(os.path.join(export, "recommender", "histories.parquet")).to_pydict()
    assert sorted(histories["user"]) == sorted(users.keys[: users.real_rows])  # every user of the table, once
    interactions = logs.interactions.to_pydict()
    watched = {}
    for user, item in zip(interactions["user"], interactions["item"]):
        watched.setdefault(user, set()).add(item)
    items = load_table(os.path.join(export, "item"))
    vocabulary = set(items.keys[: items.real_rows])
    for user, history in zip(histories["user"], histories["items"]):  # held-out items included
        assert {i for i in history if i in vocabulary} == watched[user] & vocabulary
    assert cli.main(["recommend", os.path.join(root, "LATEST", "export"), "--all", "-k", "5"]) == 0
    assert "wrote the top 5 items of 500 users" in capsys.readouterr().out
    written = pq.read_table(os.path.join(export, "recommendations.parquet"))
    assert written.schema.names == ["user", "items", "scores"]
    assert str(written.schema.field("scores").type) == "list<element: float>"
    rows = written.to_pylist()
    assert len(rows) == 500
    for row in rows:
        assert len(row["items"]) == 5 and not set(row["items"]) & watched[row["user"]]
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert set(row["items"]) <= vocabulary
    one = recommender.recommend_users(export, [rows[0]["user"]], k=5)[rows[0]["user"]]
    assert [key for key, _, _ in one] == rows[0]["items"]
    # the same from an HNSW index of the item table (built beside it), seen items still excluded
    approximate = str(tmp_path / "approximate.parquet")
    assert cli.main(["recommend", export, "--all", "-k", "5", "--approximate", "--output", approximate]) == 0
    assert os.path.exists(os.path.join(export, "item", "hnsw-dot.faiss"))
    found = {row["user"]: row["items"] for row in pq.read_table(approximate).to_pylist()}
    assert all(not set(found[u]) & watched[u] for u in found) and len(found) == 500
    overlap = np.mean([len(set(found[row["user"]]) & set(row["items"])) / 5 for row in rows])
    assert overlap >= 0.9, overlap


@pytest.mark.parametrize("model", ["bag_of_history", "self_attention"])
def test_a_history_models_query_from_item_keys_is_its_exported_user_vector(watch_run, tmp_path, model):
    _, manifest, base = watch_run
    run = os.path.join(own_copy(base, tmp_path), "runs", "w1")
    config = load_config(manifest["preprocess"]["config"]["path"])
    config = dataclasses.replace(config, training=dataclasses.replace(config.training, epochs=2, models=(model,)))
    trained = retrieval.train(config, run)
    assert trained["best_model"] == model
    export_stage(config, run)
    export = os.path.join(run, "export")
    users = load_table(os.path.join(export, "user"))
    histories = pq.read_table(os.path.join(export, "recommender", "histories.parquet")).to_pydict()
    served = recommender.Recommender(export)
    assert served.manifest["model"] == model
    vectors = served.query(histories["items"][:50])
    np.testing.assert_allclose(vectors, users.vectors[[users.row(u) for u in histories["user"][:50]]], atol=1e-5)
    # a new user: a history of raw keys, one of them never seen (an OOV row, as in training)
    history = histories["items"][0][-3:-1] + ["a movie nobody watched"]
    (ranked,) = served.recommend([history], k=4)
    assert len(ranked) == 4 and not {key for key, _ in ranked} & set(history)
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    expected = served.query([history])[0] @ load_table(os.path.join(export, "item")).vector(ranked[0][0])
    assert ranked[0][1] == pytest.approx(float(expected), rel=1e-5)


def test_item_rows_of_raw_keys_are_the_preprocessings():
    vocabulary, oov = [f"m{i}" for i in range(5)], 7
    keys = vocabulary + [f"<OOV {i}>" for i in range(oov)]
    spec = TableSpec("item", "vocabulary", ("item",), len(keys), 2, len(vocabulary), oov)
    serving = recommender.Serving(BagOfHistory(len(keys), 2, 3), spec, keys, max_history=3)
    unseen = [f"never seen {i}" for i in range(40)]
    rows = serving.rows(tf.constant([["m3", "", "<OOV 4>", *unseen]])).numpy()[0]
    assert rows[:3].tolist() == [3, -1, 9]  # a key, padding, an OOV row's own key
    # what tf.Transform's vocabulary lookup does with keys outside the vocabulary (7 buckets)
    tft_like = tf.lookup.StaticVocabularyTable(
        tf.lookup.KeyValueTensorInitializer(vocabulary, tf.range(len(vocabulary), dtype=tf.int64)),
        num_oov_buckets=oov,
    )
    expected = tft_like.lookup(tf.constant(unseen)).numpy()
    assert rows[3:].tolist() == expected.tolist() and len(set(expected)) > 3  # the buckets differ


def test_history_windows_keep_the_newest_items_right_aligned():
    model = BagOfHistory(items=5, item_dim=2, max_history=3)
    serving = recommender.Serving(
        model, TableSpec("item", "vocabulary", ("item",), rows=5, dim=2, vocabulary_size=4, oov_rows=1),
        ["a", "b", "c", "d", "<OOV 0>"], max_history=3,
    )  # fmt: skip
    rows = tf.constant([[0, -1, 1, 2, 3], [-1, -1, -1, -1, 2], [-1, -1, -1, -1, -1]], tf.int64)
    assert serving.history(rows).numpy().tolist() == [[1, 2, 3], [-1, -1, 2], [-1, -1, -1]]


def test_more_like_this_scores_the_item_tables_own_neighbours(watch_run):
    _, manifest, _ = watch_run
    like = manifest["train"]["more_like_this"]
    assert like["users"] == 500
    for model in ("two_tower", "bag_of_history"):
        assert 0 <= like[model]["hit_rate@10"] <= like[model]["hit_rate@20"] <= 1
    # planted genres: an item's neighbours share its genre, and so does a user's next item
    assert max(like[m]["hit_rate@20"] for m in ("two_tower", "bag_of_history")) > 2 * 20 / 300, like


def test_the_recommender_serves_a_new_history_through_tensorflow_alone(watch_run, tmp_path):
    _, _, base = watch_run
    saved_model = os.path.join(base, "runs", "w1", "export", "recommender", "saved_model")
    items = load_table(os.path.join(base, "runs", "w1", "export", "item"))
    history = [items.keys[3], items.keys[7], "a key the run never saw"]
    code = (
        "import json, sys\n"
        "import tensorflow as tf\n"
        "served = tf.saved_model.load(sys.argv[1])\n"
        "out = served.signatures['recommend'](item_keys=tf.constant([json.loads(sys.argv[2])]), k=tf.constant(5))\n"
        "ours = sorted({m.split('.')[0] for m in sys.modules} & {'trainer', 'schemas', 'pipeline', 'embedpipe'})\n"
        "print(json.dumps({'items': [k.decode() for k in out['items'].numpy()[0]], 'project': ours}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, saved_model, json.dumps(history)],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["project"] == []  # nothing of the project was imported: the SavedModel alone
    in_process = recommender.Recommender(os.path.join(base, "runs", "w1", "export")).recommend([history], k=5)[0]
    assert result["items"] == [key for key, _ in in_process] and not set(result["items"]) & set(history)


def _pair_settings(watch_run) -> tuple[str, dict]:
    """The tiny watch run's train shards and one epoch's `training_pairs` settings."""
    _, _, out = watch_run
    pattern = os.path.join(out, "runs", "w1", "preprocess", "data", "train-*.tfrecord.gz")
    common = dict(
        history=5, batch_size=64, pool_pairs=500, mean_pairs=20.0, seed=1, epoch=0, weighted=False,
        validation=sequences.Validation(0.2, 2),
    )  # fmt: skip
    return pattern, common


def test_pairs_without_history_windows_are_the_same_pairs_in_the_same_order(watch_run):
    pattern, common = _pair_settings(watch_run)
    full = list(sequences.training_pairs(pattern, **common))
    bare = list(sequences.training_pairs(pattern, **common, with_history=False))
    assert len(full) == len(bare) > 1
    for a, b in zip(full, bare):
        assert a["history"].shape == (64, 5) and b["history"].shape == (64, 0)
        for key in ("user", "target", "weight", "has_history", "valid"):
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_chunk_batches_hold_every_pair_once_with_its_history(watch_run):
    pattern, common = _pair_settings(watch_run)
    pairs = [
        (int(u), int(t), tuple(h.tolist()), bool(has), float(w))
        for b in sequences.training_pairs(pattern, **common)
        for u, t, h, has, w, ok in zip(
            *(b[k].numpy() for k in ("user", "target", "history", "has_history", "weight", "valid"))
        )
        if ok
    ]
    batches = list(sequences.training_pairs(pattern, **common, chunk=4))
    assert all(b["target"].shape == (64,) and b["sequence"].shape == (16, 9) for b in batches)
    chunked = [p for b in batches for p in _chunk_pairs(b, 4)]
    assert len(pairs) > 1000 and sorted(chunked) == sorted(pairs)


def test_a_fitted_models_memory_is_freed_with_it(watch_run):
    # A gradient registered by a traced function once held every trained graph, and with it the
    # tables and optimizer slots it captured, for the life of the process.
    _, _, out = watch_run
    run = os.path.join(out, "runs", "w1")
    config = load_config(os.path.join(os.path.dirname(out), "tiny_watch.yaml"))
    specs = {s.name: s for s in table_specs(config, tft.TFTransformOutput(layout.transform_dir(run)))}
    data = retrieval.Data(config, run, specs)
    table = 200_000 * 32 * 4

    def in_use() -> int:
        gc.collect()
        return tf.config.experimental.get_memory_info("CPU:0")["current"]

    def fitted(name: str) -> int:
        """TensorFlow memory in use with a fitted model of 200,000 item rows (the data never
        reaches most of them)."""
        items = dataclasses.replace(data.items, rows=200_000, dim=32)
        model = retrieval.build(name, dataclasses.replace(data.users, dim=32), items, config.max_history)
        retrieval.fit(model, name, data, epochs=1, validate=False)
        return in_use()

    for name in ("two_tower", "bag_of_history"):
        before = in_use()
        assert table <= fitted(name) - before < 2 * table  # the tables; lazy Adam's two slots went with fit
        assert in_use() - before < 1 << 20  # and the tables with the model

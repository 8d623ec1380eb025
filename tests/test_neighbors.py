"""Neighbours, recommendations and clusters over exported tables, exact and approximate."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedpipe import cli
from schemas.tables import TableSpec
from trainer import ann, neighbors, recommender
from trainer.export import write_table
from trainer.tables import load_table


def _write(path, name, vectors, keys, labels=None, oov=1):
    spec = TableSpec(name, "vocabulary", (name,), len(keys), vectors.shape[1], len(keys) - oov, oov)
    return write_table(str(path), spec, keys, vectors.astype(np.float32), np.ones(len(keys), np.int64), {}, labels)


@pytest.fixture
def planted(tmp_path):
    """60 items in 3 tight groups (+1 OOV row that points everywhere at once)."""
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 5
    group = np.repeat(np.arange(3), 20)
    vectors = np.concatenate([centres[group] + rng.normal(size=(60, 8)), centres.sum(0, keepdims=True)])
    keys = [f"m{i}" for i in range(60)] + ["<OOV 0>"]
    labels = [f"Movie {i} (g{g})" for i, g in enumerate(group)] + [""]
    return load_table(_write(tmp_path / "item", "item", vectors, keys, labels)), group


def test_neighbours_by_key_or_label_stay_in_group_and_skip_oov(planted):
    table, group = planted
    index = neighbors.NeighborIndex(table)
    by_key = index.neighbors("m0", k=5)
    assert by_key == index.neighbors("Movie 0 (g0)", k=5)
    assert [k for k, _, _ in by_key] and all(group[int(k[1:])] == 0 for k, _, _ in by_key)
    assert "m0" not in [k for k, _, _ in by_key]
    scores = [s for _, _, s in by_key]
    assert scores == sorted(scores, reverse=True) and scores[0] <= 1.0 + 1e-6
    everything = index.neighbors("m5", k=100)
    assert len(everything) == 59 and "<OOV 0>" not in [k for k, _, _ in everything]
    with pytest.raises(KeyError, match="no key or label 'nope'"):
        index.neighbors("nope")


def test_all_neighbours_in_small_blocks_match_brute_force(planted, tmp_path, monkeypatch):
    table, _ = planted
    monkeypatch.setattr(neighbors, "BLOCK_BYTES", 7 * 4 * 60)  # 7 rows a block
    result = neighbors.write_all_neighbors(table, 4, str(tmp_path / "nn.parquet"))
    written = pq.read_table(result["path"]).to_pydict()
    index = neighbors.NeighborIndex(table)
    assert written["key"] == table.keys[:60]
    for key, found in zip(written["key"], written["neighbors"]):
        assert found == [k for k, _, _ in index.neighbors(key, 4)]


def test_kmeans_recovers_planted_groups(planted, tmp_path):
    table, group = planted
    result = neighbors.write_clusters(table, 3, str(tmp_path / "clusters.parquet"))
    clusters = np.array(pq.read_table(result["path"]).column("cluster").to_pylist())
    assert sorted(result["sizes"]) == [20, 20, 20]
    for g in range(3):
        assert len(set(clusters[group == g])) == 1


def test_recommend_scores_items_for_a_user(tmp_path, capsys):
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [9.0, 9.0]])
    _write(tmp_path / "export" / "item", "item", items, ["a", "b", "c", "<OOV 0>"])
    _write(tmp_path / "export" / "user", "user", np.array([[0.0, 2.0], [1.0, 1.0]]), ["u1", "<OOV 0>"])
    best = recommender.recommend_users(str(tmp_path / "export"), ["u1"], k=2)["u1"]
    assert [k for k, _, _ in best] == ["b", "c"] and best[0][2] == pytest.approx(2.0)
    assert cli.main(["recommend", str(tmp_path / "export"), "u1", "-k", "1"]) == 0
    assert "b" in capsys.readouterr().out
    assert cli.main(["neighbors", str(tmp_path / "export" / "item"), "zzz"]) == 2
    assert capsys.readouterr().err.strip() == "embedpipe: error: table 'item' has no key or label 'zzz'"


def test_approximate_neighbours_come_from_an_index_written_beside_the_table(tmp_path, capsys):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 16)) * 3
    vectors = np.concatenate([centres[np.arange(2000) % 20] + rng.normal(size=(2000, 16)), np.ones((1, 16))])
    keys = [f"k{i}" for i in range(2000)] + ["<OOV 0>"]
    table = load_table(_write(tmp_path / "item", "item", vectors, keys))
    index = ann.HnswIndex.load_or_build(table, "cosine", ann.HnswParams(m=16, ef_construction=100, ef_search=64))
    info = json.load(open(tmp_path / "item" / "hnsw-cosine.faiss.json"))
    assert info["rows"] == 2000 and info["m"] == 16 and info["metric"] == "cosine"  # OOV rows left out
    assert info["recall@20"] >= 0.9 and info["vectors_sha256"] == table.manifest["files"]["vectors"]["sha256"]
    approximate = neighbors.write_all_neighbors(table, 10, str(tmp_path / "approximate.parquet"), index=index)
    exact = neighbors.write_all_neighbors(table, 10, str(tmp_path / "exact.parquet"))
    assert approximate["approximate"] and not exact["approximate"]
    found = pq.read_table(approximate["path"]).to_pydict()
    truth = pq.read_table(exact["path"]).to_pydict()
    assert found["key"] == truth["key"]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found["neighbors"], truth["neighbors"])])
    assert overlap >= 0.9, overlap
    assert all(key not in row for key, row in zip(found["key"], found["neighbors"]))  # never itself
    assert all(s == sorted(s, reverse=True) for s in found["scores"])
    # the CLI finds the index already there (same vectors, same parameters) and says approximate
    assert cli.main(["neighbors", str(tmp_path / "item"), "--all", "-k", "5", "--approximate"]) == 0
    assert "(approximate, " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        cli.main(["neighbors", str(tmp_path / "item"), "k1", "--approximate"])
    assert exited.value.code == 2 and "--approximate goes with --all" in capsys.readouterr().err


def test_an_index_of_other_vectors_is_rebuilt(tmp_path):
    vectors = np.random.default_rng(2).normal(size=(300, 8))
    keys = [f"k{i}" for i in range(299)] + ["<OOV 0>"]
    first = ann.HnswIndex.load_or_build(load_table(_write(tmp_path / "item", "item", vectors, keys)), "dot")
    again = ann.HnswIndex.load_or_build(load_table(_write(tmp_path / "item", "item", vectors + 1, keys)), "dot")
    assert first.info["vectors_sha256"] != again.info["vectors_sha256"]
    assert json.load(open(tmp_path / "item" / "hnsw-dot.faiss.json"))["vectors_sha256"] == again.info["vectors_sha256"]


def test_showcase_picks_the_most_frequent_key_then_the_least_like_it(tmp_path):
    # Two groups of ten; the most frequent row is in group 0, the next most frequent rows too.
    rng = np.random.default_rng(1)
    group = np.repeat([0, 1], 10)
    vectors = np.eye(2, 4)[group] * 4 + rng.normal(scale=0.3, size=(20, 4))
    keys = [f"k{i}" for i in range(20)]
    spec = TableSpec("t", "vocabulary", ("t",), 20, 4, 20, 0)
    frequency = np.array([100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 1], np.int64)
    table = load_table(write_table(str(tmp_path / "t"), spec, keys, vectors.astype(np.float32), frequency, {}))
    shown = neighbors.showcase(table, count=2, k=3)
    assert [key for key, _, _ in shown] == ["k0", "k10"]  # k10: the most frequent of the other group
    assert [label for _, label, _ in shown] == ["", ""]  # a table without labels
    assert all(group[int(k[1:])] == group[int(key[1:])] for key, _, near in shown for k, _, _ in near)
    assert [len(near) for _, _, near in shown] == [3, 3]


def test_showcase_shows_each_keys_label_and_its_neighbours_labels(planted):
    table, group = planted
    shown = neighbors.showcase(table, count=3, k=4, pool=60)
    assert [key for key, _, _ in shown] == ["m0", "m20", "m40"]  # equal counts: one per group, in row order
    for key, label, near in shown:
        assert label == table.labels[table.row(key)] and label.endswith(f"(g{group[table.row(key)]})")
        assert all(near_label.endswith(label[-4:]) for _, near_label, _ in near)

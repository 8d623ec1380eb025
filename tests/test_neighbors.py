"""Neighbours, recommendations and clusters over exported tables."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedpipe import cli
from schemas.tables import TableSpec
from trainer import neighbors
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
    best = neighbors.recommend(str(tmp_path / "export"), "u1", k=2)
    assert [k for k, _, _ in best] == ["b", "c"] and best[0][2] == pytest.approx(2.0)
    assert cli.main(["recommend", str(tmp_path / "export"), "u1", "-k", "1"]) == 0
    assert "b" in capsys.readouterr().out
    assert cli.main(["neighbors", str(tmp_path / "export" / "item"), "zzz"]) == 2
    assert capsys.readouterr().err.strip() == "embedpipe: error: table 'item' has no key or label 'zzz'"

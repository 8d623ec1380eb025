"""Drift between two runs' tables, and the limits that stop a run from being published."""

import numpy as np
import pytest

from schemas.config import DriftLimits
from schemas.layout import RunError
from trainer.drift import check_thresholds, compare_tables
from trainer.tables import EmbeddingTable


def _table(keys, vectors, frequencies, oov_rows=1):
    return EmbeddingTable("t", keys, np.asarray(vectors, np.float32), np.asarray(frequencies), {"oov_rows": oov_rows})


def test_vocabulary_drift_and_neighbour_overlap():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 4))
    old = _table([f"k{i}" for i in range(30)] + ["<OOV 0>"], np.vstack([base, [[0, 0, 0, 1]]]), [10] * 30 + [0])
    # the same space, two keys retired, three new keys carrying 25% of the rows
    keys = [f"k{i}" for i in range(28)] + ["n0", "n1", "n2", "<OOV 0>"]
    vectors = np.vstack([base[:28], rng.normal(size=(3, 4)) * 10, [[0, 0, 0, 1]]])
    freq = [10] * 28 + [30, 30, 33.33] + [0]
    drift = compare_tables(_table(keys, vectors, np.round(freq).astype(int)), old)
    assert drift["keys_added"] == 3 and drift["keys_removed"] == 2 and drift["keys"] == 31
    assert drift["new_key_traffic"] == pytest.approx(93 / 373, abs=1e-6)
    assert drift["frequency_linf"] == pytest.approx(33 / 373, abs=1e-6)  # n2's share appeared from 0
    assert 0.5 < drift["neighbor_overlap"] <= 1.0 and drift["neighbor_keys_compared"] == 28
    same = compare_tables(old, old)
    assert same["neighbor_overlap"] == 1.0 and same["keys_added"] == same["keys_removed"] == 0
    assert same["frequency_linf"] == 0 and same["new_key_traffic"] == 0
    shuffled = _table(old.keys, np.vstack([rng.normal(size=(30, 4)), [[0, 0, 0, 1]]]), old.frequencies)
    assert compare_tables(shuffled, old)["neighbor_overlap"] < 0.6  # a different space: neighbourhoods lost


def test_a_breached_limit_names_the_field_and_the_table():
    section = {"against": "ROOT/runs/yesterday", "tables": {"item": {"new_key_traffic": 0.3, "neighbor_overlap": 0.9}}}
    check_thresholds(section, DriftLimits(max_new_key_traffic=0.5, min_neighbor_overlap=0.8), "c.yaml")  # within
    with pytest.raises(
        RunError, match=r"c.yaml: drift.max_new_key_traffic: table item: 0.3 of the training rows .* \(limit 0.2\)"
    ):
        check_thresholds(section, DriftLimits(max_new_key_traffic=0.2), "c.yaml")
    with pytest.raises(RunError, match="drift.min_neighbor_overlap: table item: 0.9 .* not published"):
        check_thresholds(section, DriftLimits(min_neighbor_overlap=0.95), "c.yaml")


def test_hash_rows_are_buckets_not_keys():
    old = EmbeddingTable(
        "h", ["<hash 0>", "<hash 1>", "<hash 2>"], np.eye(3, dtype=np.float32), np.array([1, 1, 2]), {"kind": "hash"}
    )
    new = EmbeddingTable(
        "h", ["<hash 0>", "<hash 1>"], np.eye(2, 3, dtype=np.float32), np.array([1, 3]), {"kind": "hash"}
    )
    drift = compare_tables(new, old)
    assert drift["keys_added"] is None and drift["new_key_traffic"] is None
    assert drift["frequency_linf"] == pytest.approx(0.5)  # <hash 2> lost its 50%; <hash 1> went 25% -> 75%

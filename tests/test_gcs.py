"""The stages on Cloud Storage: a run's training, export, publishing, report, table loading and
garbage collection with its run directory on a local GCS emulator (the `gcs` fixture), and
their outputs against a local run's.

The failure-injection tests (`slow`) make the proxy fail a share of TensorFlow's requests during
a whole run. The Beam job itself is not run on the emulator here: Beam's GcsIO needs more of the service
than fake-gcs-server offers (a `Content-ID` per part of a batch request). Its outputs are
copied up, as Dataflow would have written them, and everything after it runs on gs://.
"""

import multiprocessing
import os

import numpy as np
import pytest
import tensorflow as tf
from gcs_proxy import set_faults

from embedpipe import runs, stages
from schemas import layout
from schemas.manifest import read_manifest, update_manifest
from trainer.report import write_report
from trainer.tables import load_table

from support import TINY_YAML, fake_run


def _upload(local: str, remote: str) -> int:
    """Copies the directory `local` to `remote` file by file; returns the number of files."""
    copied = 0
    for folder, _, files in os.walk(local):
        target = remote + folder[len(local) :]
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(folder, name), f"{target}/{name}", overwrite=True)
            copied += 1
    return copied


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local"))
    stages.run_all(["--config", TINY_YAML, "--output", out, "--run-id", "r1", "--epochs", "2", "--no-report"])
    return layout.run_dir(out, "r1")


def _run_on_gcs(root: str, run_id: str, local_run: str) -> dict:
    """The local run's Beam outputs copied to ROOT/runs/RUN_ID, then train, export and publish
    there; returns the export section."""
    run = layout.run_dir(root, run_id)
    assert _upload(layout.preprocess_dir(local_run), layout.preprocess_dir(run)) > 10
    update_manifest(run, "preprocess", read_manifest(local_run)["preprocess"])
    flags = ["--config", TINY_YAML, "--output", root, "--run-id", run_id]
    stages.train([*flags, "--epochs", "2"])
    exported = stages.export(flags)
    stages.publish(["--output", root, "--run-id", run_id])
    return exported


def _fresh(function, *args):
    """`function(*args)` in a new interpreter (which inherits the emulator's environment).

    TensorFlow's GCS filesystem reads its settings (retries, the CA bundle, auth) when it is first
    used; an earlier test of the session may have used it without the emulator's, so every
    scenario here runs where it is used for the first time.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def _published_on_gcs(root: str, local_run: str) -> dict:
    exported = _run_on_gcs(root, "r1", local_run)
    run = layout.run_dir(root, "r1")
    tables = {}
    for name in exported["tables"]:
        table = load_table(f"{root}/LATEST/export/{name}")  # checksums verified on gs://
        tables[name] = (table.keys, table.vectors)
    serving = tf.saved_model.load(layout.serving_dir(layout.model_dir(run)))
    report = write_report(run)
    return {
        "latest": layout.latest(root),
        "complete": layout.is_complete(run),
        "eval_metrics": read_manifest(run)["train"]["eval_metrics"],
        "tables": tables,
        "signatures": list(serving.signatures),
        "report": (report, tf.io.gfile.stat(report).length),
    }


def test_a_run_on_gcs_trains_exports_publishes_and_equals_the_local_run(gcs, local_run):
    root = f"{gcs}/tiny"
    got = _fresh(_published_on_gcs, root, local_run)
    assert got["latest"] == layout.run_dir(root, "r1") and got["complete"]
    local = read_manifest(local_run)
    assert got["eval_metrics"] == local["train"]["eval_metrics"]
    assert sorted(got["tables"]) == sorted(local["export"]["tables"])
    for name, (keys, vectors) in got["tables"].items():
        here = load_table(local["export"]["tables"][name])
        assert keys == here.keys
        np.testing.assert_array_equal(vectors, here.vectors)  # the same training, bitwise
    assert "serving_default" in got["signatures"]
    report, size = got["report"]
    assert report.startswith("gs://") and size > 10_000


def _gc_on_gcs(root: str) -> dict:
    for run_id in ("r1", "r2", "r3"):
        fake_run(root, run_id)
        runs.publish(root, run_id)
    result = runs.collect_garbage(root, keep=1)
    return {
        **result,
        "left": tf.io.gfile.listdir(f"{root}/runs"),
        "latest": layout.latest(root),
        "dim": load_table(f"{root}/LATEST/export/t").dim,
    }


def test_gc_on_gcs_keeps_latest_and_deletes_older_runs(gcs):
    root = f"{gcs}/gc"
    got = _fresh(_gc_on_gcs, root)
    assert got["deleted"] == ["r1", "r2"] and got["kept"] == ["r3"]
    assert [name.rstrip("/") for name in got["left"]] == ["r3"]
    assert got["latest"] == layout.run_dir(root, "r3") and got["dim"] == 2


def _faulty_run(root: str, local_run: str, env: dict, kind: str, rate: float) -> dict:
    _run_on_gcs(root, "good", local_run)
    set_faults(env, rate, kind, seed=7)
    try:
        _run_on_gcs(root, "faulty", local_run)
        outcome = "published"
    except Exception as e:  # what a failed run raises is part of the result, reported below
        outcome = f"failed with {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    counts = set_faults(env, 0.0)
    latest = layout.latest(root)
    runs.verify(latest)  # complete, every table against its checksums
    return {
        "counts": counts,
        "outcome": outcome,
        "latest": latest,
        "dim": load_table(f"{root}/LATEST/export/carrier").dim,
    }


@pytest.mark.slow  # 1.5-2.5 minutes each: TensorFlow's retries, and over a thousand relayed requests
@pytest.mark.parametrize("kind, rate", [("503", 0.1), ("reset", 0.02), ("mixed", 0.05)])
def test_failed_requests_never_leave_latest_on_an_incomplete_run(gcs_service, local_run, kind, rate, capsys):
    """A share of TensorFlow's GCS requests fails during a whole run (upload, train, export,
    publish): the run retries or fails, and LATEST always names a complete run that verifies."""
    root = f"{gcs_service['root']}/faults-{kind}"
    got = _fresh(_faulty_run, root, local_run, gcs_service["proxy_env"], kind, rate)
    counts, outcome = got["counts"], got["outcome"]
    with capsys.disabled():
        print(f"\nfaults {kind} at {rate:.0%}: {counts['failed']} of {counts['requests']} requests; the run {outcome}")
    assert sum(counts["failed"].values()) > 0
    assert got["latest"] == layout.run_dir(root, "faulty" if outcome == "published" else "good") and got["dim"] > 0

"""The whole job on Cloud Storage: `embedpipe run` with its config, inputs and output root on a
local GCS emulator (the `gcs` fixture), against the same runs on local disk.

On gs:// the Beam job reads the CSV or Parquet input through Beam's GcsIO and writes its examples,
dead letters and counts there; tf.Transform, the trainer, the export, the report and the `LATEST`
pointer use TensorFlow's filesystem or google-cloud-storage; a warm start reads the last
published run's tables from gs://. The Beam job's outputs, the trained tables (bitwise) and the
metrics must equal the local runs'. Garbage collection and failure injection (`slow`: the proxy
fails a share of all requests during a whole run) run there too.
"""

import multiprocessing
import os
import shutil

import pytest
import tensorflow as tf
from gcs_proxy import set_faults

from embedpipe import runs, stages
from pipeline import synthetic
from schemas import layout
from schemas.manifest import read_manifest
from trainer import recommender
from trainer.tables import load_table

from support import FLEX_MAIN, TINY_WATCH_YAML, TINY_YAML, exported_tables, fake_run, load_module, preprocess_outputs

TINY_CSV = os.path.join(os.path.dirname(TINY_YAML), "tiny.csv")
# (root name, config file, run ids: each after the first warm-starts from the one before)
RUNS = {"tiny": ("tiny.yaml", ("r1",)), "warm": ("tiny.yaml", ("r1", "r2")), "watch": ("tiny_watch.yaml", ("w1",))}


def _upload(local: str, remote: str) -> None:
    """Copies the files of the directory `local` to `remote`."""
    for name in os.listdir(local):
        tf.io.gfile.copy(os.path.join(local, name), f"{remote}/{name}", overwrite=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> str:
    """A folder with both tiny configs and their inputs: the supervised CSV and the collaborative
    Parquet watch logs with item metadata."""
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copy(TINY_YAML, folder)
    shutil.copy(TINY_CSV, folder)
    shutil.copy(TINY_WATCH_YAML, folder)
    logs = synthetic.generate_watch_logs(num_users=120, num_items=60, num_groups=3, mean_interactions=10, seed=3)
    synthetic.write_watch_logs(logs, str(folder))
    return str(folder)


def _run(inputs: str, root: str, name: str) -> dict:
    """The runs of `RUNS[name]` under ROOT/NAME, their config and inputs read from `inputs`;
    returns each one's outputs (`_outputs`), by run id."""
    config, run_ids = RUNS[name]
    got = {}
    for i, run_id in enumerate(run_ids):
        _run_all(f"{inputs}/{config}", f"{root}/{name}", run_id, *(["--warm-start"] if i else []))
        got[run_id] = _outputs(f"{root}/{name}", run_id, inputs)
    return got


def _run_all(config: str, root: str, run_id: str, *flags: str) -> None:
    stages.run_all(["--config", config, "--output", root, "--run-id", run_id, "--epochs", "2", *flags])


def _outputs(root: str, run_id: str, inputs: str) -> dict:
    """What must not depend on the filesystem (a dead letter's source file named from `inputs` on)."""
    run = layout.run_dir(root, run_id)
    train = runs.verify(run)["train"]  # finished, every table against its checksums
    started_from = train.get("transfer") or train.get("warm_start") or {}
    preprocess = preprocess_outputs(run)
    preprocess["dead_letters"] = [line.replace(inputs, "INPUTS") for line in preprocess["dead_letters"]]
    return {
        "preprocess": preprocess,
        "eval_metrics": train["eval_metrics"],
        "tables": exported_tables(run),
        # through the pointer, as a downstream reader loads them (the run was just published)
        "via_latest": {t: load_table(f"{root}/LATEST/export/{t}").vectors.tobytes() for t in train["tables"]},
        "signatures": sorted(tf.saved_model.load(_serving_model(run)).signatures),
        "warm_started": sorted(started_from),
        "latest": os.path.relpath(layout.latest(root), root),
        "report": tf.io.gfile.stat(os.path.join(run, layout.REPORT)).length,
    }


def _serving_model(run: str) -> str:
    """The SavedModel a downstream service loads: the supervised model's, or the recommender's."""
    supervised = layout.serving_dir(layout.model_dir(run))
    return (
        supervised
        if tf.io.gfile.exists(supervised)
        else os.path.join(layout.recommender_dir(layout.export_dir(run)), recommender.SAVED_MODEL)
    )


def _on_gcs(inputs: str, root: str, name: str) -> dict:
    _upload(inputs, f"{root}/inputs")
    return _run(f"{root}/inputs", root, name)


def _fresh(function, *args):
    """`function(*args)` in a new interpreter (which inherits the emulator's environment).

    TensorFlow's GCS filesystem reads its settings (retries, the CA bundle, auth) when it is first
    used; an earlier test of the session may have used it without the emulator's, so every
    scenario here runs where it is used for the first time.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


@pytest.mark.parametrize("name", ["tiny", *(pytest.param(n, marks=pytest.mark.slow) for n in ("warm", "watch"))])
def test_the_whole_run_on_gcs_equals_the_local_run(gcs, inputs, tmp_path, name):
    """tiny: a config and its CSV input on gs://, a supervised model (about 60 s); warm: then a
    second run warm-started from the first one's tables on gs://; watch: Parquet watch logs with
    item metadata, the collaborative models and the recommender."""
    local = _run(inputs, str(tmp_path), name)
    remote = _fresh(_on_gcs, inputs, f"{gcs}/whole-{name}", name)
    assert remote.keys() == local.keys()
    for run_id, here in local.items():
        there = remote[run_id]
        assert there["preprocess"]["row_counts"]["read"] > 0 and there["tables"]
        assert there.pop("report") > 10_000 and here.pop("report") > 10_000
        for part, outputs in here.pop("preprocess").items():  # one at a time: readable failures
            assert there["preprocess"][part] == outputs, (run_id, part)
        del there["preprocess"]
        assert there == here, run_id
        assert there["via_latest"] == {t: vectors for t, (_, vectors) in there["tables"].items()}
        assert there["signatures"]
    *_, last = local.values()
    assert last["latest"] == f"runs/{list(local)[-1]}"
    if len(local) > 1:  # the warm start found the first run's tables on gs://
        assert last["warm_started"] and sorted(last["tables"]) == sorted(local[next(iter(local))]["tables"])


def _template_launch(inputs: str, root: str) -> dict:
    _upload(inputs, f"{root}/inputs")
    config, run_dir = f"{root}/inputs/tiny.yaml", layout.run_dir(root, "t1")
    argv = [f"--config={config}", f"--output={root}", "--run_id=t1", f"--template_location={root}/template/job"]
    assert load_module(FLEX_MAIN, "embedpipe_flex_main").main(argv) is None  # submitted, not waited for
    before = {
        "section": "preprocess" in read_manifest(run_dir),
        "counts": tf.io.gfile.exists(layout.row_counts_path(run_dir)),
    }
    stages.train(["--config", config, "--output", root, "--run-id", "t1", "--epochs", "1"])
    return {**before, "rows": read_manifest(run_dir)["preprocess"]["rows"]}


@pytest.mark.slow  # about 40 s
def test_a_template_launch_on_gcs_is_finalised_by_train(gcs, inputs):
    got = _fresh(_template_launch, inputs, f"{gcs}/template")
    assert not got["section"] and got["counts"]  # the job's own counts, no manifest section yet
    rows = got["rows"]
    assert (rows["read"], rows["train"] + rows["eval"], rows["dead_letter"]) == (244, 240, 4)


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


def _faulty_run(inputs: str, root: str, env: dict, kind: str, rate: float) -> dict:
    _upload(inputs, f"{root}/inputs")
    config = f"{root}/inputs/tiny.yaml"
    _run_all(config, root, "good", "--no-report")
    set_faults(env, rate, kind, seed=7)
    try:
        _run_all(config, root, "faulty", "--no-report")
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


@pytest.mark.slow  # 1.5-2.5 minutes each: the clients' retries, and thousands of relayed requests
@pytest.mark.parametrize("kind, rate", [("503", 0.1), ("reset", 0.02), ("mixed", 0.05)])
def test_failed_requests_never_leave_latest_on_an_incomplete_run(gcs_service, inputs, kind, rate, capsys):
    """A share of all GCS requests (Beam's, TensorFlow's, the pointer's) fails during a whole
    run: the run retries or fails, and LATEST always names a complete run that verifies."""
    root = f"{gcs_service['root']}/faults-{kind}"
    got = _fresh(_faulty_run, inputs, root, gcs_service["proxy_env"], kind, rate)
    counts, outcome = got["counts"], got["outcome"]
    with capsys.disabled():
        print(f"\nfaults {kind} at {rate:.0%}: {counts['failed']} of {counts['requests']} requests; the run {outcome}")
    assert sum(counts["failed"].values()) > 0
    assert got["latest"] == layout.run_dir(root, "faulty" if outcome == "published" else "good") and got["dim"] > 0

"""Versioned runs: LATEST only ever names a complete run, whatever happens to the next one."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from embedpipe import cli, runs, stages
from schemas import layout
from schemas.manifest import update_manifest
from trainer.tables import load_table

from support import TINY_YAML as TINY
from support import fake_run as _fake_run


def test_publish_points_latest_at_a_verified_run_and_resolves_latest_paths(tmp_path):
    assert layout.latest(str(tmp_path)) is None
    first = _fake_run(tmp_path, "d1")
    pointer = runs.publish(str(tmp_path), "d1")
    assert pointer["run_dir"] == "runs/d1" and layout.latest(str(tmp_path)) == first and layout.is_complete(first)
    second = _fake_run(tmp_path, "d2")
    runs.publish(str(tmp_path), "d2")
    assert layout.latest(str(tmp_path)) == second
    assert layout.resolve(os.path.join(str(tmp_path), "LATEST", "export", "t")) == os.path.join(second, "export", "t")
    assert load_table(os.path.join(str(tmp_path), "LATEST", "export", "t")).keys == ["a", "b", "<OOV 0>"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # the pointer was renamed into place


def test_an_incomplete_or_damaged_run_is_never_published(tmp_path):
    good = _fake_run(tmp_path, "good")
    runs.publish(str(tmp_path), "good")
    half = layout.run_dir(str(tmp_path), "half")
    update_manifest(half, "preprocess", {"config": {"sha256": "abc"}})  # crashed during training
    with pytest.raises(layout.RunError, match="not a finished run .*lacks train, export"):
        runs.publish(str(tmp_path), "half")
    damaged = _fake_run(tmp_path, "damaged")
    with open(os.path.join(damaged, "export", "t", "vectors.w2v.txt"), "ab") as f:
        f.write(b"x")  # a file load_table does not read by default: publish checks every file
    with pytest.raises(layout.RunError, match="exported table t does not verify: .*vectors.w2v.txt: checksum"):
        runs.publish(str(tmp_path), "damaged")
    with pytest.raises(layout.RunError, match="no such run"):
        runs.publish(str(tmp_path), "never")
    assert layout.latest(str(tmp_path)) == good
    _fake_run(tmp_path, "newer")
    runs.publish(str(tmp_path), "newer")
    with pytest.raises(layout.RunError, match="older complete run .* --force"):
        runs.publish(str(tmp_path), "good")  # no silent rollback
    runs.publish(str(tmp_path), "good", force=True)
    assert layout.latest(str(tmp_path)) == good


def test_prepare_restarts_an_unfinished_run_and_keeps_a_finished_one(tmp_path):
    done = _fake_run(tmp_path, "done", digest="abc")
    runs.publish(str(tmp_path), "done")
    assert runs.prepare(str(tmp_path), "done", "abc") is True
    with pytest.raises(layout.RunError, match="another config"):
        runs.prepare(str(tmp_path), "done", "other")
    leftover = _fake_run(tmp_path, "crashed")  # everything written, never published
    assert runs.prepare(str(tmp_path), "crashed", "abc") is False
    assert os.listdir(leftover) == ["_STARTED"]  # the earlier attempt's files are gone; a fresh start is dated
    assert os.path.exists(done)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 129])
def test_unsafe_run_ids_are_refused(bad):
    with pytest.raises(layout.RunError, match="--run-id"):
        layout.check_run_id(bad)


def test_the_default_run_id_is_the_utc_time():
    assert re.fullmatch(r"\d{8}T\d{6}Z", layout.default_run_id())


@pytest.mark.parametrize("stage", ["preprocess", "train", "export"])
def test_stage_commands_never_rewrite_a_complete_run(tmp_path, capsys, stage):
    _fake_run(tmp_path, "done")
    runs.publish(str(tmp_path), "done")
    assert cli.main([stage, "--config", TINY, "--output", str(tmp_path), "--run-id", "done"]) == 2
    assert "is a complete run; stages never rewrite one" in capsys.readouterr().err


# Where the crash test kills `embedpipe run`: (a line of its output, seconds after it).
KILL_POINTS = [
    ("embedpipe: run: config", 0.0),
    ("pipeline.preprocess: preprocess: /", 0.5),
    ("pipeline.preprocess: preprocess: /", 3.0),
    ("rows read", 0.0),
    ("train: embedding model", 0.0),
    ("Epoch 1/", 0.0),
    ("Epoch 2/", 0.0),
    ("train: eval", 0.0),
    ("export: carrier", 0.0),
    ("export: distance_bucket", 0.0),
]


@pytest.mark.slow
def test_a_run_killed_anywhere_leaves_latest_on_a_complete_run(tmp_path):
    root = str(tmp_path / "root")
    assert stages.run_all(["--config", TINY, "--output", root, "--run-id", "r0", "--epochs", "2"])
    published = "r0"
    for i, (pattern, delay) in enumerate(KILL_POINTS):
        run_id = f"k{i}"
        command = [
            sys.executable,
            "-m",
            "embedpipe.cli",
            "run",
            "--config",
            TINY,
            "--output",
            root,
            "--run-id",
            run_id,
            "--epochs",
            "2",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # see each line as it is written
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
        )
        seen = []
        for line in process.stdout:
            seen.append(line)
            if pattern in line:
                time.sleep(delay)
                break
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, f"kill point {i} ({pattern!r}) never came:\n{''.join(seen[-20:])}"
        # the reader's view: still the previous complete run, and all of it verifies
        assert layout.latest(root) == layout.run_dir(root, published), f"kill point {i}"
        runs.verify(layout.latest(root))
        assert not layout.is_complete(layout.run_dir(root, run_id))
        # ... and the same run again succeeds
        manifest = stages.run_all(["--config", TINY, "--output", root, "--run-id", run_id, "--epochs", "2"])
        assert layout.latest(root) == layout.run_dir(root, run_id) and manifest["export"]["tables"]
        published = run_id
    pointer = json.load(open(os.path.join(root, layout.LATEST)))
    assert pointer["run_id"] == f"k{len(KILL_POINTS) - 1}"


def test_warm_start_skips_a_table_whose_config_changed(tmp_path):
    import dataclasses

    from schemas.loading import load_config

    path = _fake_run(tmp_path, "yesterday", table="carrier", keys=("AA", "UA", "<OOV 0>"))
    runs.publish(str(tmp_path), "yesterday")
    config = load_config(TINY)
    warm = {f.name: f.init_from for f in runs.warm_start(config, str(tmp_path)).categorical}
    assert warm["carrier"].path == os.path.join(path, "export", "carrier") and warm["carrier"].trainable
    assert warm["hour"] is None  # yesterday exported no hour table
    carrier = next(f for f in config.categorical if f.name == "carrier")
    changed = dataclasses.replace(
        config, categorical=tuple(dataclasses.replace(f, dim=5) if f is carrier else f for f in config.categorical)
    )
    assert all(f.init_from is None for f in runs.warm_start(changed, str(tmp_path)).categorical)  # dim 5 != 2: fresh


def test_gc_keeps_latest_the_newest_runs_what_they_name_and_what_may_still_run(tmp_path, capsys):
    root = str(tmp_path)
    for run_id in ("d1", "d2", "d3", "d4", "d5"):
        _fake_run(root, run_id)
        runs.publish(root, run_id)
    warm = {"two_tower": {"item": {"source": f"{root}/runs/d1/export/item", "match_rate": 1.0}}}
    update_manifest(layout.run_dir(root, "d5"), "train", {"warm_start": warm})
    later = time.time() + 100 * 3600  # "now", 100 hours after these runs were published
    for run_id, hours_ago in (("running", 1), ("abandoned", 60)):
        _fake_run(root, run_id)  # unfinished: never published
        manifest = os.path.join(layout.run_dir(root, run_id), "manifest.json")
        os.utime(manifest, (later - hours_ago * 3600, later - hours_ago * 3600))
    dry = runs.collect_garbage(root, keep=2, dry_run=True, now=later)
    assert dry["deleted"] == ["abandoned", "d2", "d3"] and os.path.isdir(layout.run_dir(root, "d2"))
    result = runs.collect_garbage(root, keep=2, now=later)
    assert result["why"] == {
        "d5": "LATEST",
        "d4": "one of the newest 2",
        "running": "unfinished, may still be running",
        "d1": "the warm-start source of a kept run",
    }
    assert sorted(os.listdir(os.path.join(root, "runs"))) == ["d1", "d4", "d5", "running"]
    assert layout.latest(root) == layout.run_dir(root, "d5") and runs.verify(layout.latest(root))
    # a run in progress since less than abandoned-hours may have warm-started from the run LATEST
    # named when it started: every complete run of that window, and the newest before it, stay
    assert cli.main(["gc", "--output", root, "--keep", "1"]) == 0
    out = capsys.readouterr().out
    assert "deleted 0 run(s)" in out and "a possible warm-start source of an unfinished run" in out
    with pytest.raises(layout.RunError, match="keep at least"):
        runs.collect_garbage(root, keep=0)

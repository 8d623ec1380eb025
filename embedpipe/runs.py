"""Versioned runs under one output root: starting one, publishing it, warm-starting from the last.

    ROOT/
      LATEST                  {"run_id": ID, "run_dir": "runs/ID", "published_at": ...}
      runs/<ID>/              one run: manifest.json, preprocess/, model/, export/
      runs/<ID>/_COMPLETE     written by `publish` once the run verified complete

(every path of a run, and how `LATEST` is read, is `schemas.layout`)

`embedpipe run --output ROOT --run-id ID` (ID defaults to the UTC time, `20261123T220000Z`)
writes only inside `runs/<ID>/` and, at the very end, `publish`es: it checks that every stage
finished and every exported table loads against its checksums, writes `_COMPLETE`, then
replaces `LATEST` in one step (a new object written to a temporary name and renamed over the old
one on a local disk; one object write on GCS, where every object write is atomic), so readers
see the old pointer or the new one, never a partial one. Until then readers of `LATEST` keep
seeing the previous complete run, whatever happens to this one. The replace is a compare and
swap (`schemas.layout.replace_latest`): `LATEST` moves only from the pointer this publish read
when it started — a generation precondition on gs://, an exclusive lock around the check and
the rename locally — so of several publishers that start from the same `LATEST` exactly one
wins and the others fail with `PublishConflict` (their runs stay finished and unpublished).
Other filesystems tf.io.gfile reaches (hdfs://; this TensorFlow has no s3://) get the check and a
rename without that guarantee.

Re-running an ID is idempotent: a complete run with the same config is published again without
recomputing; an incomplete one (a crash, a kill) is deleted and started over; a complete run
made with a different config is refused. Stage commands (`embedpipe preprocess|train|export
--output ROOT --run-id ID`) write to the same `runs/<ID>/`, and `embedpipe publish --output ROOT
--run-id ID` publishes it, which is what a scheduler runs as its last task (see deploy/).

Warm start (`--warm-start`, `warm_start`): today's tables start from the last published run's,
matched by key. Every table (supervised features and crosses; collaborative `item` and `user`)
that the run `ROOT/LATEST` points at exported starts from that table, fine-tuned (`init_from`
with `trainable: true`, see docs/transfer.md): a key seen yesterday starts where it was, so
neighbours and downstream lookups stay stable from day to day, while new keys start fresh. The
tables keep yesterday's dim (`dim: auto` follows the source). The match rate per table is in the
manifest (`train.transfer`, or `train.warm_start` for collaborative runs). Without a published
run (the first day) the run starts from scratch. The source run is what `LATEST` names when
the run starts, resolved once (`warm_start`); a table whose config no longer fits
yesterday's starts fresh, with a warning.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import uuid

import tensorflow as tf

from schemas import layout
from schemas.config import CollaborativeConfig, Config, DriftLimits, TableInit
from schemas.layout import (
    COMPLETE,
    LATEST,
    RUNS,
    STAGES,
    RunError,
    is_complete,
    latest,
    read_json,
    run_dir,
    table_manifest,
    write_json_atomically,
)
from schemas.manifest import read_manifest, update_manifest
from trainer import drift
from trainer.tables import TableError, verify_table

_LOG = logging.getLogger(__name__)


def prepare(root: str, run_id: str, config_digest: str) -> bool:
    """Gets `runs/<run_id>/` ready for a run.

    Returns:
        True when it is already complete with this config (nothing to do); False when it is
        ready to be written (an unfinished earlier attempt is deleted first).

    Raises:
        RunError: it is complete but was made with another config.
    """
    path = run_dir(root, run_id)
    if is_complete(path):
        done = read_json(os.path.join(path, COMPLETE))
        if done.get("config_sha256") != config_digest:
            raise RunError(
                f"{path} is a complete run made with another config (sha256 {done.get('config_sha256', '?')[:12]}, "
                f"this one {config_digest[:12]}); use a new --run-id"
            )
        return True
    if tf.io.gfile.exists(path):
        # Left by a run that did not finish: nothing in it was published, start it over.
        tf.io.gfile.rmtree(path)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    tf.io.gfile.makedirs(path)
    write_json_atomically(os.path.join(path, layout.STARTED), {"run_id": run_id, "started_at": started})
    return False


def verify(path: str) -> dict:
    """Checks that `path` holds a finished run whose every exported table verifies.

    Returns:
        The run's manifest.

    Raises:
        RunError: a stage is missing from the manifest, or a table fails its checksums.
    """
    manifest = read_manifest(path)
    missing = [s for s in STAGES if s not in manifest]
    if missing:
        raise RunError(f"{path}: not a finished run (manifest lacks {', '.join(missing)})")
    for name in manifest["export"]["tables"]:
        try:
            verify_table(layout.table_dir(path, name))  # under the run dir: runs can move
        except TableError as e:
            raise RunError(f"{path}: exported table {name} does not verify: {e}") from None
    return manifest


def publish(
    root: str,
    run_id: str,
    config_digest: str | None = None,
    drift_limits: DriftLimits | None = None,
    config_source: str = "",
    force: bool = False,
    expected: layout.Pointer | None = None,
) -> dict:
    """Verifies `runs/<run_id>/`, compares it with the published run, marks it complete and
    points `LATEST` at it.

    Args:
        root: the output root.
        run_id: the run to publish.
        config_digest: what a re-run of the ID must match (default: the manifest's).
        drift_limits: limits checked on the comparison with the published run (`trainer.drift`,
            the manifest's `drift` section); default: those the preprocess stage recorded.
        config_source: the config file named in a drift error (default: the recorded one).
        force: allow pointing `LATEST` back at an older complete run (a rollback).
        expected: the `LATEST` this publish starts from (default: read now); `LATEST` moves
            only if it is still that when the new pointer is written (`layout.replace_latest`).

    Returns:
        The pointer written to `LATEST`.

    Raises:
        RunError: no such run, not finished, a table does not verify, a drift limit is
            breached, or a rollback without `force`.
        PublishConflict: another publisher moved `LATEST` meanwhile (nothing of this run is
            changed but its `_COMPLETE` marker: it can be published again).
    """
    path = run_dir(root, run_id)
    if not tf.io.gfile.exists(path):
        raise RunError(f"{path}: no such run to publish")
    expected = expected or layout.read_latest(root)
    current = _latest_or_none(root, expected)
    if is_complete(path) and current not in (None, path) and not force:
        raise RunError(f"{path} is an older complete run and LATEST is on {current}; pass --force to roll LATEST back")
    manifest = verify(path)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    previous = current
    if not is_complete(path) and previous is not None and previous != path:
        section = drift.compare_runs(path, previous)
        update_manifest(path, "drift", section)
        if drift_limits is None:  # the limits of the config the run was made with
            recorded = manifest["preprocess"].get("config", {}).get("drift_limits")
            drift_limits = DriftLimits(**recorded) if recorded else None
        if drift_limits is not None:
            source = config_source or manifest["preprocess"].get("config", {}).get("path") or path
            drift.check_thresholds(section, drift_limits, source)
    marked = not is_complete(path)
    if marked:  # before the pointer moves: LATEST never names a run without its marker
        digest = config_digest or manifest["preprocess"].get("config", {}).get("sha256", "")
        write_json_atomically(
            os.path.join(path, COMPLETE), {"run_id": run_id, "completed_at": now, "config_sha256": digest}
        )
    pointer = {"run_id": run_id, "run_dir": f"{RUNS}/{run_id}", "published_at": now, "publish_id": uuid.uuid4().hex}
    try:
        layout.replace_latest(root, expected, pointer)
    except layout.PublishConflict:
        if marked:  # back to a finished, unpublished run: it can be published again later
            tf.io.gfile.remove(os.path.join(path, COMPLETE))
        raise
    return pointer


def _latest_or_none(root: str, pointer: layout.Pointer) -> str | None:
    """The complete run `pointer` names; None without one (a damaged pointer must not block the
    run that replaces it: a warning, and no drift comparison)."""
    if pointer.data is None:
        return None
    path = os.path.join(root, pointer.data["run_dir"])
    if not is_complete(path):
        _LOG.warning("publish: %s points at %s, which is not a complete run; no drift comparison", LATEST, path)
        return None
    return path


def warm_start(config: Config | CollaborativeConfig, root: str) -> Config | CollaborativeConfig:
    """`config` with `init_from` set on each table the latest run under `root` exported.

    The source is the run LATEST names now (resolved once, so the stages of one run agree). A
    table whose config no longer fits yesterday's (an explicit dim that differs, a hash table
    whose bucket count or type changed) starts fresh, with a warning, rather than failing every
    run from now on."""
    previous = latest(root)
    if previous is None:
        return config

    def source(name: str, dim, hash_rows: int | None) -> TableInit | None:
        path = layout.table_dir(previous, name)
        old = table_manifest(path)
        if old is None:
            return None
        kind_changed = (hash_rows is not None) != (old.get("kind") == "hash")
        if (
            (dim != "auto" and int(dim) != old["dim"])
            or kind_changed
            or (hash_rows is not None and hash_rows != old["rows"])
        ):
            _LOG.warning("warm start: %s no longer fits %s (dim, type or buckets changed); it starts fresh", name, path)
            return None
        return TableInit(path=path, trainable=True, warm_start=True)

    if isinstance(config, CollaborativeConfig):
        sides = {}
        for field in ("user", "item"):
            side = getattr(config, field)
            init = source(side.name, side.dim, None) if side.init_from is None else None
            if init is not None:
                sides[field] = dataclasses.replace(side, init_from=init)
        return dataclasses.replace(config, **sides)
    features = []
    for f in config.categorical:
        init = source(f.name, f.dim, f.hash_buckets if f.type == "hash" else None) if f.init_from is None else None
        features.append(dataclasses.replace(f, init_from=init) if init else f)
    return dataclasses.replace(config, categorical=tuple(features))


ABANDONED_HOURS = 48.0  # an unfinished run untouched this long is abandoned
_RUN_REFERENCE = re.compile(rf"{RUNS}/([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})")


def collect_garbage(
    root: str, keep: int, abandoned_hours: float = ABANDONED_HOURS, dry_run: bool = False, now: float | None = None
) -> dict:
    """Deletes old complete runs and abandoned unfinished ones under `root` (`embedpipe gc`).

    Kept, whatever their age:

    * the run `LATEST` names, and the newest `keep` complete runs (by their `_COMPLETE` time);
    * unfinished runs touched (their `manifest.json` or `_STARTED` marker) in the last
      `abandoned_hours`, and those with neither file: they may still be running (a finished
      run that was never published, e.g. the loser of a `PublishConflict`, counts as
      unfinished: publish it within `abandoned_hours` or it goes);
    * while such a run exists, every complete run published in that window and the newest one
      before it: the run may have warm-started from any of them (`warm_start` reads the `LATEST`
      of its start);
    * every run a kept run warm-started from (its manifest's `train.warm_start` and
      `train.transfer` sources), transitively.

    Args:
        root: the output root.
        keep: complete runs to keep (at least 1).
        abandoned_hours: age after which an unfinished run is deleted.
        dry_run: only say what would be deleted.
        now: the time to measure ages from (seconds since the epoch; default now).

    Returns:
        {"kept": [ids], "deleted": [ids], "why": {id: reason}, "dry_run": bool}.

    Raises:
        RunError: `keep` < 1, or `LATEST` names a run that is not complete.
    """
    if keep < 1:
        raise RunError(f"--keep {keep}: keep at least the run LATEST names (1)")
    now = datetime.datetime.now(datetime.UTC).timestamp() if now is None else now
    folder = os.path.join(root, RUNS)
    ids = sorted(i.rstrip("/") for i in tf.io.gfile.listdir(folder)) if tf.io.gfile.isdir(folder) else []
    current = latest(root)
    complete, unfinished = {}, {}
    for run_id in ids:
        path = run_dir(root, run_id)
        if is_complete(path):
            complete[run_id] = read_json(os.path.join(path, COMPLETE)).get("completed_at", "")
        else:
            unfinished[run_id] = _touched(path)
    why = {}
    if current is not None:
        why[os.path.basename(current)] = "LATEST"
    for run_id in sorted(complete, key=lambda i: (complete[i], i), reverse=True)[:keep]:
        why.setdefault(run_id, f"one of the newest {keep}")
    window = now - abandoned_hours * 3600
    running = [i for i, touched in unfinished.items() if touched >= window]
    for run_id in running:
        why[run_id] = "unfinished, may still be running"
    if running:
        start = datetime.datetime.fromtimestamp(window, datetime.UTC).isoformat(timespec="seconds")
        before = [i for i in complete if complete[i] < start]
        for run_id in [i for i in complete if complete[i] >= start] + sorted(before, key=complete.get)[-1:]:
            why.setdefault(run_id, "a possible warm-start source of an unfinished run")
    pending = list(why)
    while pending:
        for run_id in _warm_start_sources(run_dir(root, pending.pop())):
            if run_id in complete and run_id not in why:
                why[run_id] = "the warm-start source of a kept run"
                pending.append(run_id)
    deleted = [i for i in ids if i not in why]
    for run_id in deleted:
        _LOG.info("gc: %s %s", "would delete" if dry_run else "deleting", run_dir(root, run_id))
        if not dry_run:
            tf.io.gfile.rmtree(run_dir(root, run_id))
    return {"kept": [i for i in ids if i in why], "deleted": deleted, "why": why, "dry_run": dry_run}


def _warm_start_sources(path: str) -> set[str]:
    """The run ids whose tables the run at `path` started from (its manifest's `train.warm_start`
    and `train.transfer` sources)."""
    manifest = os.path.join(path, layout.MANIFEST)
    if not tf.io.gfile.exists(manifest):
        return set()
    train = read_json(manifest).get("train", {})
    sources = [entry.get("source", "") for entry in train.get("transfer", {}).values()]
    for tables in train.get("warm_start", {}).values():  # {model: {table: report}}
        sources += [report.get("source", "") for report in tables.values()]
    return {m for source in sources for m in _RUN_REFERENCE.findall(str(source))}


def _touched(path: str) -> float:
    """When an unfinished run last changed (seconds since the epoch): the newer of its manifest
    and its `_STARTED` marker; +inf (never abandoned) when it has neither (a run that started
    before markers existed, or one being created right now: a directory has no time on gs://)."""
    times = [
        tf.io.gfile.stat(f).mtime_nsec / 1e9
        for f in (os.path.join(path, layout.MANIFEST), os.path.join(path, layout.STARTED))
        if tf.io.gfile.exists(f)
    ]
    return max(times) if times else float("inf")

"""Versioned runs under one output root, and the `LATEST` pointer readers follow.

    ROOT/
      LATEST                  {"run_id": ID, "run_dir": "runs/ID", "published_at": ...}
      runs/<ID>/              one run: manifest.json, preprocess/, model/, export/
      runs/<ID>/_COMPLETE     written by `publish` once the run verified complete

`embedpipe run --output ROOT --run-id ID` (ID defaults to the UTC time, `20261123T220000Z`)
writes only inside `runs/<ID>/` and, at the very end, `publish`es: it checks that every stage
finished and every exported table loads against its checksums, writes `_COMPLETE`, then
replaces `LATEST` in one step (a new object written to a temporary name and renamed over the old
one: atomic on a local or POSIX file system; on GCS/S3 every object write is atomic, so readers
see the old pointer or the new one, never a partial one). Until then readers of `LATEST` keep
seeing the previous complete run, whatever happens to this one.

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

import tensorflow as tf

from pipeline.manifest import read_json, read_manifest, update_manifest, write_json_atomically
from schemas.config import CollaborativeConfig, Config, TableInit

_LOG = logging.getLogger(__name__)
LATEST = "LATEST"
COMPLETE = "_COMPLETE"
RUNS = "runs"
STAGES = ("preprocess", "train", "export")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunError(RuntimeError):
    """A run that cannot be started, published or read as asked."""


def default_run_id(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise RunError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 128, not starting with . - _)")
    return run_id


def run_dir(root: str, run_id: str) -> str:
    return os.path.join(root, RUNS, check_run_id(run_id))


def is_complete(path: str) -> bool:
    return tf.io.gfile.exists(os.path.join(path, COMPLETE))


def prepare(root: str, run_id: str, config_digest: str) -> bool:
    """Gets `runs/<run_id>/` ready for a run; True when it is already complete (nothing to do)."""
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
    return False


def verify(path: str) -> dict:
    """Checks that `path` holds a finished run whose every exported table verifies; returns its manifest."""
    from trainer.tables import TableError, load_table

    manifest = read_manifest(path)
    missing = [s for s in STAGES if s not in manifest]
    if missing:
        raise RunError(f"{path}: not a finished run (manifest lacks {', '.join(missing)})")
    for name in manifest["export"]["tables"]:
        try:
            load_table(os.path.join(path, "export", name), verify="all")  # under the run dir: runs can move
        except TableError as e:
            raise RunError(f"{path}: exported table {name} does not verify: {e}") from None
    return manifest


def publish(
    root: str,
    run_id: str,
    config_digest: str | None = None,
    drift_limits=None,
    config_source: str = "",
    force: bool = False,
) -> dict:
    """Verifies `runs/<run_id>/`, compares it with the published run (`trainer.drift`, the
    manifest's `drift` section; `drift_limits`, default the ones the preprocess stage recorded
    from the config, raise RunError when breached), marks it complete and points `LATEST` at
    it; returns the pointer.

    `config_digest` (default: the manifest's) is what a re-run of the ID must match. Publishing
    an already complete run that is not the latest one (a rollback) needs `force`.
    """
    path = run_dir(root, run_id)
    if not tf.io.gfile.exists(path):
        raise RunError(f"{path}: no such run to publish")
    current = _latest_or_none(root)
    if is_complete(path) and current not in (None, path) and not force:
        raise RunError(f"{path} is an older complete run and LATEST is on {current}; pass --force to roll LATEST back")
    manifest = verify(path)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    previous = current
    if not is_complete(path) and previous is not None and previous != path:
        from schemas.config import DriftLimits
        from trainer import drift

        section = drift.compare_runs(path, previous)
        update_manifest(path, "drift", section)
        if drift_limits is None:  # the limits of the config the run was made with
            recorded = manifest["preprocess"].get("config", {}).get("drift_limits")
            drift_limits = DriftLimits(**recorded) if recorded else None
        if drift_limits is not None:
            source = config_source or manifest["preprocess"].get("config", {}).get("path") or path
            drift.check_thresholds(section, drift_limits, source)
    if not is_complete(path):
        digest = config_digest or manifest["preprocess"].get("config", {}).get("sha256", "")
        write_json_atomically(os.path.join(path, COMPLETE), {"run_id": run_id, "completed_at": now, "config_sha256": digest})
    pointer = {"run_id": run_id, "run_dir": f"{RUNS}/{run_id}", "published_at": now}
    write_json_atomically(os.path.join(root, LATEST), pointer)
    return pointer


def latest(root: str) -> str | None:
    """The directory of the run `ROOT/LATEST` points at (None before the first publish)."""
    pointer_path = os.path.join(root, LATEST)
    if not tf.io.gfile.exists(pointer_path):
        return None
    pointer = read_json(pointer_path)
    path = os.path.join(root, pointer["run_dir"])
    if not is_complete(path):
        raise RunError(f"{pointer_path} points at {path}, which is not a complete run")
    return path


def _latest_or_none(root: str) -> str | None:
    try:
        return latest(root)
    except RunError as e:  # a damaged pointer must not block the run that replaces it
        _LOG.warning("publish: %s; publishing without a drift comparison", e)
        return None


def resolve(path: str) -> str:
    """`ROOT/LATEST/sub/path` -> `ROOT/runs/<published id>/sub/path`; other paths unchanged.

    So any path into a run can name "the latest published one", e.g.
    `load_table("embedpipe_output/taxi/LATEST/export/dow_x_hour")`.
    """
    parts = path.replace("\\", "/").split("/")
    if LATEST not in parts[1:]:
        return path
    i = parts.index(LATEST, 1)
    root = "/".join(parts[:i])
    run = latest(root)
    if run is None:
        raise RunError(f"{path}: {os.path.join(root, LATEST)} does not exist (nothing published under {root} yet)")
    return os.path.join(run, *parts[i + 1 :])


def resolve_run(path: str) -> str:
    """A run directory from a root (-> its latest published run), a `.../LATEST/...` path or a run dir."""
    if tf.io.gfile.exists(os.path.join(path, LATEST)):
        return latest(path)
    return resolve(path)


def table_manifest(path: str) -> dict | None:
    """The manifest of the exported table at `path` (a `.../LATEST/...` path resolved), None
    when there is no table there."""
    manifest = os.path.join(resolve(path), "manifest.json")
    return read_json(manifest) if tf.io.gfile.exists(manifest) else None


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
        path = os.path.join(previous, "export", name)
        old = table_manifest(path)
        if old is None:
            return None
        kind_changed = (hash_rows is not None) != (old.get("kind") == "hash")
        if (dim != "auto" and int(dim) != old["dim"]) or kind_changed or (hash_rows is not None and hash_rows != old["rows"]):
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

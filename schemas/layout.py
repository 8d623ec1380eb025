"""The run directory: every path of a run, the `LATEST` pointer, and how both are read.

The bottom of the layers (see the README's "Code layout"): it imports nothing of the project but `schemas.errors`, so
the Beam job, the trainer, the exporter and the orchestration all find a run's files here and
nowhere else::

    ROOT/
      LATEST                        {"run_id": ID, "run_dir": "runs/ID", "published_at": ...}
      runs/<ID>/                    one run (`run_dir`)
        _STARTED                    written when `embedpipe run` starts it (`embedpipe.runs.prepare`)
        _COMPLETE                   written when the run is published (`embedpipe.runs.publish`)
        manifest.json               `schemas.manifest`
        report.html                 `trainer.report`
        preprocess/transform/       tf.Transform output (`transform_dir`)
        preprocess/data/            {train,eval}-*.tfrecord.gz (`examples_pattern`)
        preprocess/dead_letter/     rejected-*.jsonl (`dead_letter_pattern`)
        preprocess/id_counts.json   (`id_counts_path`)
        model/                      supervised: model.keras, serving/, logs/, history.json (`model_dir`)
        model/<model>/tables.npz    collaborative: one directory per model (`retrieval_tables_path`)
        baseline/                   the numeric-only supervised model (`model_dir(baseline=True)`)
        export/<table>/             exported tables (`table_dir`)
        export/recommender/         collaborative: SavedModel, histories.parquet (`recommender_dir`)
        export/recommendations.parquet   `embedpipe recommend EXPORT --all` (`recommendations_path`)

A run directory may also be used on its own (no root, no run id): the stage commands without
`--run-id` write straight into their `--output`. What writes and publishes runs is
`embedpipe.runs`; this module only names and reads them.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass

import tensorflow as tf

from schemas.errors import RunError

LATEST = "LATEST"
COMPLETE = "_COMPLETE"
STARTED = "_STARTED"  # written when `embedpipe run` starts a run (`embedpipe.runs.prepare`)
RUNS = "runs"
MANIFEST = "manifest.json"
REPORT = "report.html"
TABLE_MANIFEST = "manifest.json"
STAGES = ("preprocess", "train", "export")
TRAIN = "train"
EVAL = "eval"
SPLITS = (TRAIN, EVAL)
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# -- JSON files of a run ----------------------------------------------------------------------


def read_json(path: str) -> dict:
    """The JSON object in `path` (any filesystem TensorFlow reads: local, gs://)."""
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def write_json_atomically(path: str, data: dict) -> None:
    """Writes `data` to a temporary name and renames it over `path`: readers see the old file or
    the new one, never a partial one."""
    temp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(temp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tf.io.gfile.rename(temp, path, overwrite=True)


# -- runs under a root ------------------------------------------------------------------------


def default_run_id(now: datetime.datetime | None = None) -> str:
    """The run id of a run started at `now` (default: now), e.g. `20261123T220000Z` (UTC)."""
    now = now or datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y%m%dT%H%M%SZ")


def check_run_id(run_id: str) -> str:
    """`run_id` itself; raises RunError unless it is safe as one directory name."""
    if not _RUN_ID.match(run_id):
        raise RunError(
            f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 128, not starting with . - _)"
        )
    return run_id


def run_dir(root: str, run_id: str) -> str:
    """`ROOT/runs/<run_id>`; raises RunError for an unsafe id."""
    return os.path.join(root, RUNS, check_run_id(run_id))


def root_of(path: str) -> str:
    """The root holding the run directory `path` (`ROOT/runs/<id>` -> `ROOT`)."""
    return os.path.dirname(os.path.dirname(path))


def is_complete(path: str) -> bool:
    """True when the run directory `path` was published (`_COMPLETE` exists)."""
    return tf.io.gfile.exists(os.path.join(path, COMPLETE))


def latest(root: str) -> str | None:
    """The directory of the run `ROOT/LATEST` points at (None before the first publish).

    Raises:
        RunError: the pointer names a run that is not complete.
    """
    pointer_path = os.path.join(root, LATEST)
    if not tf.io.gfile.exists(pointer_path):
        return None
    pointer = read_json(pointer_path)
    path = os.path.join(root, pointer["run_dir"])
    if not is_complete(path):
        raise RunError(f"{pointer_path} points at {path}, which is not a complete run")
    return path


class PublishConflict(RunError):
    """`LATEST` changed between the moment a publisher read it and its write."""


@dataclass(frozen=True)
class Pointer:
    """`ROOT/LATEST` as one publisher read it: its content (None before the first publish) and
    the version `replace_latest` compares against (the object's generation on gs://, a sha256 of
    the file's bytes on a local disk)."""

    data: dict | None
    version: int | str | None


def read_latest(root: str) -> Pointer:
    """`ROOT/LATEST` with its version (see `Pointer`), for a later `replace_latest`."""
    path = os.path.join(root, LATEST)
    if path.startswith("gs://"):
        bucket, name = _gcs_object(path)
        while True:
            blob = bucket.get_blob(name)
            if blob is None:
                return Pointer(None, None)
            try:  # the content of exactly that generation
                data = blob.download_as_bytes(if_generation_match=blob.generation)
            except _gcs_exceptions().PreconditionFailed:
                continue  # replaced between the two requests: read the new one
            return Pointer(json.loads(data), int(blob.generation))
    if not tf.io.gfile.exists(path):
        return Pointer(None, None)
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    return Pointer(json.loads(data), hashlib.sha256(data).hexdigest())


def replace_latest(root: str, expected: Pointer, data: dict) -> None:
    """Points `ROOT/LATEST` at `data` only if it is still what `expected` read (compare and swap).

    On gs:// the write carries a generation precondition (`if_generation_match`: 0 when there
    was no pointer), so of several publishers that read the same pointer exactly one wins; on a
    local disk the check and the atomic rename happen under an exclusive lock
    (`ROOT/.LATEST.lock`, `fcntl.flock`, released if the process dies). Other filesystems
    tf.io.gfile reaches (hdfs://) get the check and a rename, without the guarantee against a
    concurrent publisher.

    `data` should be unique to this publish (`embedpipe.runs.publish` puts a random
    `publish_id` in it): a write found in place after a failed precondition is taken as this one.

    Raises:
        PublishConflict: `LATEST` changed since `expected` was read.
    """
    path = os.path.join(root, LATEST)
    if path.startswith("gs://"):
        bucket, name = _gcs_object(path)
        try:
            bucket.blob(name).upload_from_string(
                json.dumps(data, indent=2, sort_keys=True) + "\n",
                content_type="application/json",
                if_generation_match=expected.version or 0,
            )
        except _gcs_exceptions().PreconditionFailed:
            # The client retries a conditional upload; when the first attempt landed but its
            # answer was lost, the retry fails its precondition on our own write.
            if read_latest(root).data != data:
                raise _conflict(root, expected) from None
        return
    with _local_lock(root):
        if read_latest(root).version != expected.version:
            raise _conflict(root, expected)
        write_json_atomically(path, data)


@contextlib.contextmanager
def _local_lock(root: str):
    """An exclusive lock on `ROOT/.LATEST.lock` (`fcntl.flock`, released when the file closes or
    the process dies) for a local root; nothing for other filesystems."""
    if "://" in root:
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".LATEST.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _conflict(root: str, expected: Pointer) -> PublishConflict:
    now = read_latest(root).data
    was = (expected.data or {}).get("run_id", "nothing")
    return PublishConflict(
        f"{os.path.join(root, LATEST)} moved from {was} to {(now or {}).get('run_id', 'nothing')} while this "
        "publish ran (another publisher won); LATEST is left as it is"
    )


def _gcs_object(path: str):
    """(bucket, object name) of a gs:// path, through google-cloud-storage (which also honours
    `STORAGE_EMULATOR_HOST`)."""
    # imported for gs:// roots only: most runs never need the client (it comes with apache-beam[gcp])
    from google.cloud import storage

    bucket, _, name = path[len("gs://") :].partition("/")
    return _gcs_client(storage).bucket(bucket), name


@functools.cache
def _gcs_client(storage):
    return storage.Client()


def _gcs_exceptions():
    from google.api_core import exceptions

    return exceptions


def resolve(path: str) -> str:
    """`ROOT/LATEST/sub/path` -> `ROOT/runs/<published id>/sub/path`; other paths unchanged.

    So any path into a run can name "the latest published one", e.g.
    `load_table("embedpipe_output/taxi/LATEST/export/dow_x_hour")`.

    Raises:
        RunError: nothing is published under that root yet, or its pointer is broken.
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


# -- inside one run ---------------------------------------------------------------------------


def preprocess_dir(output_dir: str) -> str:
    """Everything the preprocess job writes."""
    return os.path.join(output_dir, "preprocess")


def transform_dir(output_dir: str) -> str:
    """The tf.Transform output (`transform_fn/`, `transformed_metadata/`)."""
    return os.path.join(preprocess_dir(output_dir), "transform")


def examples_prefix(output_dir: str, split: str) -> str:
    """The shard prefix of a split's transformed examples (`.../data/train`)."""
    return os.path.join(preprocess_dir(output_dir), "data", split)


def examples_pattern(output_dir: str, split: str) -> str:
    """The glob of a split's gzip TFRecord shards."""
    return examples_prefix(output_dir, split) + "-*.tfrecord.gz"


def dead_letter_prefix(output_dir: str) -> str:
    """The shard prefix of the rejected rows (JSON lines)."""
    return os.path.join(preprocess_dir(output_dir), "dead_letter", "rejected")


def dead_letter_pattern(output_dir: str) -> str:
    """The glob of the rejected rows' shards."""
    return dead_letter_prefix(output_dir) + "-*.jsonl"


def row_counts_path(output_dir: str) -> str:
    """The job's own row counts, JSON: {"read", "train", "eval", "dead_letter_<reason>", ...:
    total}, written by the job itself so that a stage after it can finalise the manifest
    (a template launch never sees Beam's counters)."""
    return os.path.join(preprocess_dir(output_dir), "row_counts.json")


def id_counts_path(output_dir: str) -> str:
    """{table: {row id: occurrences in the training split}}, JSON."""
    return os.path.join(preprocess_dir(output_dir), "id_counts.json")


def read_id_counts(output_dir: str) -> dict[str, dict[str, int]]:
    """{table: {row id: occurrences in the training split}}, as the preprocess job wrote it."""
    return read_json(id_counts_path(output_dir))


def model_dir(output_dir: str, baseline: bool = False) -> str:
    """The supervised model (`model.keras`, `serving/`, `logs/`, `history.json`), or the
    numeric-only baseline's; also the parent of the collaborative models."""
    return os.path.join(output_dir, "baseline" if baseline else "model")


def keras_model_path(model_directory: str) -> str:
    """The Keras model file in a `model_dir`."""
    return os.path.join(model_directory, "model.keras")


def serving_dir(model_directory: str) -> str:
    """The serving SavedModel (raw features in, `prediction` out) in a `model_dir`."""
    return os.path.join(model_directory, "serving")


def history_path(model_directory: str) -> str:
    """Keras' per-epoch history (JSON) in a `model_dir`."""
    return os.path.join(model_directory, "history.json")


def logs_dir(model_directory: str) -> str:
    """TensorBoard training curves in a `model_dir`."""
    return os.path.join(model_directory, "logs")


def retrieval_model_dir(output_dir: str, model: str) -> str:
    """One collaborative model's directory."""
    return os.path.join(model_dir(output_dir), model)


def retrieval_tables_path(output_dir: str, model: str) -> str:
    """A collaborative model's learned matrices (`.npz`, one array per table, no pickle)."""
    return os.path.join(retrieval_model_dir(output_dir, model), "tables.npz")


def export_dir(output_dir: str) -> str:
    """The exported tables, one directory each."""
    return os.path.join(output_dir, "export")


def table_dir(output_dir: str, table: str) -> str:
    """An exported table's directory (`trainer.export`)."""
    return os.path.join(export_dir(output_dir), table)


def recommender_dir(export_directory: str) -> str:
    """The recommender of a collaborative export (`trainer.recommender`), from the export's directory."""
    return os.path.join(export_directory, "recommender")


def histories_path(export_directory: str) -> str:
    """Every user's history (`user`, `items` oldest first) beside the recommender."""
    return os.path.join(recommender_dir(export_directory), "histories.parquet")


def recommendations_path(export_directory: str) -> str:
    """Top-k items of every user (`embedpipe recommend EXPORT --all`)."""
    return os.path.join(export_directory, "recommendations.parquet")


def stage_outputs(output_dir: str) -> list[str]:
    """The directories the stages write; a new preprocess makes them all stale."""
    return [preprocess_dir(output_dir), model_dir(output_dir), export_dir(output_dir)]


def table_manifest(path: str) -> dict | None:
    """The manifest of the exported table at `path` (a `.../LATEST/...` path resolved), None
    when there is no table there."""
    manifest = os.path.join(resolve(path), TABLE_MANIFEST)
    return read_json(manifest) if tf.io.gfile.exists(manifest) else None

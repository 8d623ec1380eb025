"""The preprocessing job: raw logs -> gzip TFRecords (train/eval) + tf.Transform graph + manifest.

Run locally (DirectRunner, in-process, offline)::

    python -m pipeline.preprocess --config taxi --output /tmp/taxi

Run on Dataflow (any other Beam runner takes its standard options the same way)::

    python -m pipeline.preprocess --config flights --input gs://BUCKET/flights.parquet \
        --output gs://BUCKET/runs/flights --runner DataflowRunner --project PROJECT \
        --region us-central1 --temp_location gs://BUCKET/tmp --setup_file ./setup.py

Outputs under `<output>/preprocess/`: `transform/` (WriteTransformFn: transform_fn and
transformed_metadata, vocabularies named after their feature), `data/train-*.tfrecord.gz`,
`data/eval-*.tfrecord.gz`, `dead_letter/*.jsonl`, `id_counts.json`; and the `preprocess`
section of `<output>/manifest.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time

import apache_beam as beam
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from tfx_bsl.public import tfxio

from pipeline import collaborative, rows, runs, transforms
from pipeline.manifest import drop_sections, update_manifest
from pipeline.preprocessing import make_preprocessing_fn
from pipeline.tables import table_specs
from pipeline.transforms import (
    DEAD,
    EVAL,
    NAMESPACE,
    TRAIN,
    ParseAndValidate,
    ReadRawLogs,
    SplitTrainEval,
    TransformAndWrite,
    WriteDeadLetters,
)
from schemas.config import CollaborativeConfig, Config, ConfigError, DatasetConfig, load_config

_LOG = logging.getLogger(__name__)

# The in-process runner DirectRunner uses for batch pipelines, named directly (see pipeline_options).
LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"

TF_TYPES = {"int": tf.int64, "float": tf.float32, "string": tf.string}


def preprocess_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "preprocess")


def transform_dir(output_dir: str) -> str:
    return os.path.join(preprocess_dir(output_dir), "transform")


def examples_pattern(output_dir: str, split: str) -> str:
    return os.path.join(preprocess_dir(output_dir), "data", f"{split}-*.tfrecord.gz")


def id_counts_path(output_dir: str) -> str:
    return os.path.join(preprocess_dir(output_dir), "id_counts.json")


def read_id_counts(output_dir: str) -> dict[str, dict[str, int]]:
    """{table: {row id: occurrences in the training split}}, as `CountIds` wrote it."""
    with tf.io.gfile.GFile(id_counts_path(output_dir)) as f:
        return json.load(f)


def raw_feature_spec(config: Config, include_label: bool = True) -> dict:
    return {
        col: tf.io.FixedLenFeature([], TF_TYPES[kind])
        for col, kind in config.input.columns.items()
        if include_label or col != config.label.column
    }


def tensor_adapter_config(config: Config) -> tfxio.TensorAdapterConfig:
    """How tf.Transform turns the canonical RecordBatches of `pipeline.rows` into tensors."""
    return transforms.tensor_adapter_config(raw_feature_spec(config), rows.canonical_schema(config))


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner", "direct"):
        # Beam's DirectRunner would first try the Prism runner, which downloads a binary. The
        # FnApiRunner is what DirectRunner runs batch pipelines on anyway; name it directly so a
        # local run stays in-process and offline. --direct_num_workers and
        # --direct_running_mode keep working.
        standard.runner = LOCAL_RUNNER
    return options


def build_pipeline(p: beam.Pipeline, config: Config, out: str, temp_dir: str) -> None:
    """Adds the whole job to `p`, writing under `out` (`<output>/preprocess`); the steps read as
    the list in the module docstring."""
    with tft_beam.Context(temp_dir=temp_dir):
        read = p | "ReadRawLogs" >> ReadRawLogs(config)
        validated = read.rows | "ParseAndValidate" >> ParseAndValidate(config)
        split = validated.rows | "SplitTrainEval" >> SplitTrainEval(config)
        _ = {TRAIN: split[TRAIN], EVAL: split[EVAL]} | "TransformAndWrite" >> TransformAndWrite(
            make_preprocessing_fn(config), tensor_adapter_config(config), out, {t: t for t in config.tables}
        )
        _ = (read[DEAD], validated[DEAD]) | "WriteDeadLetters" >> WriteDeadLetters(
            os.path.join(out, "dead_letter", "rejected")
        )


def preprocess(config: DatasetConfig, output_dir: str, beam_args: list[str] | None = None) -> dict:
    """Runs the job and writes the manifest section; returns that section."""
    matches = FileSystems.match([config.input.path])[0].metadata_list
    if not matches:
        raise rows.InputError(f"input.path: no file matches {config.input.path!r} (config {config.source})")
    for match in matches:
        with FileSystems.open(match.path) as f:
            rows.check_input_file(f, config, match.path)  # the CSV header, the Parquet columns
    out = preprocess_dir(output_dir)
    # An earlier attempt's outputs must not pass for this one's: its shards, and the model, tables
    # and manifest sections made from them.
    stale = [d for d in (out, os.path.join(output_dir, "model"), os.path.join(output_dir, "export")) if FileSystems.exists(d)]
    if stale:
        FileSystems.delete(stale)
    drop_sections(output_dir, ("train", "baseline", "export", "drift"))
    options = pipeline_options(list(beam_args or []))
    _LOG.info("preprocess: %s (%d file(s)) -> %s", config.input.path, len(matches), out)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="embedpipe-tft-") as local_temp:
        p = beam.Pipeline(options=options)
        build = collaborative.build_pipeline if isinstance(config, CollaborativeConfig) else build_pipeline
        build(p, config, out, options.get_all_options().get("temp_location") or local_temp)
        result = p.run()
        result.wait_until_finish()
    elapsed = time.time() - started
    counts = _counters(result)
    dead = {k[len("dead_letter_"):]: v for k, v in counts.items() if k.startswith("dead_letter_")}
    dead_letters = os.path.join(out, "dead_letter", "rejected-*.jsonl")
    rows.check_bad_fraction(counts.get("rows_read", 0), dead, config, dead_letters)  # before anything is published
    tft_output = tft.TFTransformOutput(transform_dir(output_dir))
    specs = table_specs(config, tft_output)
    section = {
        "config": {
            "name": config.name,
            "path": config.source,
            "sha256": config.digest(),
            "drift_limits": dataclasses.asdict(config.drift),  # what `embedpipe publish` checks
        },
        "inputs": {"path": config.input.path, "format": config.input.format, "files": [m.path for m in matches]},
        "rows": {
            "read": counts.get("rows_read", 0),
            "train": counts.get("rows_train", 0),
            "eval": counts.get("rows_eval", 0),
            "dead_letter": sum(dead.values()),
            "dead_letter_by_reason": dict(sorted(dead.items())),
        },
        **({"users_evaluated": counts.get("users_evaluated", 0)} if isinstance(config, CollaborativeConfig) else {}),
        "tables": {s.name: s.to_json_dict() for s in specs},
        "outputs": {
            "transform": transform_dir(output_dir),
            "train": examples_pattern(output_dir, TRAIN),
            "eval": examples_pattern(output_dir, EVAL),
            "dead_letter": dead_letters,
            "id_counts": id_counts_path(output_dir),
        },
        "timings_s": {"preprocess": round(elapsed, 2)},
    }
    r = section["rows"]
    if r["read"] != r["train"] + r["eval"] + r["dead_letter"]:
        raise RuntimeError(f"row counts do not add up: {r}")  # a bug, never an input problem
    _LOG.info(
        "preprocess: %d rows read -> %d train, %d eval, %d dead-lettered (%.1fs)",
        r["read"], r["train"], r["eval"], r["dead_letter"], elapsed,
    )
    update_manifest(output_dir, "preprocess", section)
    return section


def _counters(result) -> dict[str, int]:
    query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
    counts: dict[str, int] = {}
    for c in query["counters"]:
        # Portable Flink reports attempted counters only (committed is None there).
        value = c.committed if c.committed is not None else (c.attempted or 0)
        counts[c.key.metric.name] = counts.get(c.key.metric.name, 0) + value
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="taxi", help="bundled config name or path to a YAML config (default: taxi)")
    parser.add_argument("--input", help="input file or glob; overrides input.path of the config")
    parser.add_argument(
        "--output",
        help="output directory (default: embedpipe_output/<config name>); with --run-id, the root that holds runs/<id>/",
    )
    parser.add_argument("--run-id", help="write to OUTPUT/runs/RUN_ID/ (a versioned run; see pipeline.runs)")
    parser.add_argument(
        "--warm-start",
        action="store_true",
        help="with --run-id: start every table from the last published run's (OUTPUT/LATEST), matched by key",
    )
    parser.add_argument("--item-metadata", help="collaborative configs: item metadata file; overrides item_metadata.path")


def resolve(args: argparse.Namespace, allow_complete: bool = False) -> tuple[DatasetConfig, str]:
    """(config, run directory) from the common flags. A stage command refuses a run that is
    already complete (published or ready to be): rewriting it would change what LATEST serves;
    `embedpipe run` (`allow_complete`) re-publishes it instead."""
    config = load_config(args.config)
    if args.input:
        config = config.with_input_path(args.input)
    if args.item_metadata:
        if not isinstance(config, CollaborativeConfig) or config.metadata is None:
            raise ConfigError(f"{config.source}: --item-metadata needs a collaborative config with item_metadata")
        config = dataclasses.replace(config, metadata=dataclasses.replace(config.metadata, path=args.item_metadata))
    root = args.output or os.path.join("embedpipe_output", config.name)
    if not getattr(args, "run_id", None):
        if getattr(args, "warm_start", False):
            raise ConfigError("--warm-start needs --run-id (it starts from OUTPUT/LATEST, the last published run)")
        return config, root
    path = runs.run_dir(root, args.run_id)
    if not allow_complete and runs.is_complete(path):
        raise runs.RunError(f"{path} is a complete run; stages never rewrite one (use a new --run-id)")
    if getattr(args, "warm_start", False):
        config = runs.warm_start(config, root)
    return config, path


def run(argv: list[str] | None = None) -> dict:
    """Entry point: own flags via argparse, everything else becomes Beam pipeline options."""
    parser = argparse.ArgumentParser(prog="embedpipe preprocess", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    config, output_dir = resolve(args)
    return preprocess(config, output_dir, beam_args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run()

"""The preprocessing job: raw logs -> gzip TFRecords (train/eval) + tf.Transform graph + manifest.

    ReadRawLogs | ParseAndValidate | SplitTrainEval | TransformAndWrite     (+ WriteDeadLetters)

`preprocess(config, output_dir, beam_args)` runs it into one run directory; `embedpipe preprocess`
is its command line (DirectRunner by default; any Beam runner with its standard options)::

    embedpipe preprocess --config taxi --output /tmp/taxi
    embedpipe preprocess --config flights --input gs://BUCKET/flights.parquet \
        --output gs://BUCKET/embedpipe/flights --run-id 20261123 --runner DataflowRunner \
        --project PROJECT --region us-central1 --temp_location gs://BUCKET/tmp --setup_file ./setup.py

Outputs, where `schemas.layout` puts them: the transform graph (vocabularies named after their
feature), both splits' examples, the dead letters, `id_counts.json`, and the `preprocess` section
of the run manifest. Collaborative configs build their job in `pipeline.collaborative`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
import time

import apache_beam as beam
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from tfx_bsl.public import tfxio

from pipeline import collaborative, rows, transforms
from pipeline.preprocessing import make_preprocessing_fn
from pipeline.transforms import (
    DEAD,
    EVAL,
    TRAIN,
    ParseAndValidate,
    ReadRawLogs,
    SplitTrainEval,
    TransformAndWrite,
    WriteDeadLetters,
    WriteRowCounts,
    input_counts,
    rows_counted,
)
from schemas import layout
from schemas.config import CollaborativeConfig, Config, DatasetConfig
from schemas.features import raw_feature_spec
from schemas.manifest import drop_sections, update_manifest
from schemas.progress import Heartbeat
from schemas.tables import table_specs

_LOG = logging.getLogger(__name__)

# The in-process runner DirectRunner uses for batch pipelines, named directly (see pipeline_options).
LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def tensor_adapter_config(config: Config) -> tfxio.TensorAdapterConfig:
    """How tf.Transform turns the canonical RecordBatches of `pipeline.rows` into tensors."""
    return transforms.tensor_adapter_config(raw_feature_spec(config), rows.canonical_schema(config))


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Beam's options from `beam_args`; the DirectRunner (the default) as the in-process runner."""
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner", "direct"):
        # Beam's DirectRunner would first try the Prism runner, which downloads a binary. The
        # FnApiRunner is what DirectRunner runs batch pipelines on anyway; name it directly so a
        # local run stays in-process and offline. --direct_num_workers and
        # --direct_running_mode keep working.
        standard.runner = LOCAL_RUNNER
    return options


def build_pipeline(p: beam.Pipeline, config: Config, output_dir: str, temp_dir: str) -> None:
    """Adds the whole supervised job to `p`, writing into the run `output_dir`; the steps read as
    the list in the module docstring."""
    with tft_beam.Context(temp_dir=temp_dir):
        read = p | "ReadRawLogs" >> ReadRawLogs(config)
        validated = read.rows | "ParseAndValidate" >> ParseAndValidate(config)
        split = validated.rows | "SplitTrainEval" >> SplitTrainEval(config)
        _ = {TRAIN: split[TRAIN], EVAL: split[EVAL]} | "TransformAndWrite" >> TransformAndWrite(
            make_preprocessing_fn(config),
            tensor_adapter_config(config),
            output_dir,
            functools.partial(transforms.count_column_ids, columns={t: t for t in config.tables}),
        )
        _ = (read[DEAD], validated[DEAD]) | "WriteDeadLetters" >> WriteDeadLetters(
            layout.dead_letter_prefix(output_dir)
        )
        _ = (
            *input_counts(read, validated),
            split[TRAIN] | "CountTrain" >> beam.Map(rows_counted, "train"),
            split[EVAL] | "CountEval" >> beam.Map(rows_counted, "eval"),
        ) | "WriteRowCounts" >> WriteRowCounts(layout.row_counts_path(output_dir))


def preprocess(
    config: DatasetConfig, output_dir: str, beam_args: list[str] | None = None, *, wait: bool = True
) -> dict | None:
    """Runs the preprocessing job into the run directory `output_dir`.

    Checks every input file first (a CSV header, the Parquet columns), drops what an earlier
    attempt left there (its examples, model and tables), runs the job on the Beam runner that
    `beam_args` name (the in-process runner by default) and writes the manifest section
    (`finalize`).

    Args:
        config: a supervised or collaborative config.
        output_dir: the run directory (`schemas.layout`).
        beam_args: Beam pipeline options (`--runner`, `--direct_num_workers`, ...).
        wait: wait for the job and finalise the manifest; False for a Flex Template launch,
            whose job only starts after this process exits: the next stage finalises it then
            (`finalize`, from the row counts the job writes itself).

    Returns:
        The `preprocess` manifest section: config, inputs, rows per split and dead-letter reason,
        tables, outputs, timings. None when not waiting.

    Raises:
        InputError: no input file matches, a file's columns do not fit, or more rows were
            dead-lettered than `input.max_bad_fraction` allows.
    """
    matches = _input_files(config)
    for match in matches:
        with FileSystems.open(match) as f:
            rows.check_input_file(f, config, match)  # the CSV header, the Parquet columns
    # An earlier attempt's outputs must not pass for this one's: its shards, and the model, tables
    # and manifest sections made from them.
    stale = [d for d in layout.stage_outputs(output_dir) if FileSystems.exists(d)]
    if stale:
        FileSystems.delete(stale)
    drop_sections(output_dir, ("preprocess", "train", "baseline", "export", "drift"))
    options = pipeline_options(list(beam_args or []))
    _LOG.info("preprocess: %s (%d file(s)) -> %s", config.input.path, len(matches), layout.preprocess_dir(output_dir))
    unused = [c for c in config.input.columns if c not in config.used_columns]
    if unused:
        _LOG.info("preprocess: not read by anything, so not validated: %s", ", ".join(unused))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="embedpipe-tft-") as local_temp:
        p = beam.Pipeline(options=options)
        build = collaborative.build_pipeline if isinstance(config, CollaborativeConfig) else build_pipeline
        build(p, config, output_dir, options.get_all_options().get("temp_location") or local_temp)
        with Heartbeat(_LOG, "preprocess"):  # tf.Transform's own steps log nothing for minutes
            result = p.run()
            if not wait:
                _LOG.info("preprocess: job submitted; the next stage finalises the manifest from its row counts")
                return None
            result.wait_until_finish()
    return finalize(config, output_dir, matches, time.time() - started)


def finalize(
    config: DatasetConfig, output_dir: str, files: list[str] | None = None, elapsed: float | None = None
) -> dict:
    """Writes the `preprocess` manifest section of a finished job, from what the job wrote.

    The rows come from the job's own `row_counts.json` (`layout.row_counts_path`), the tables
    from the transform output; nothing needs the job's handle, so a stage after a Flex Template
    launch can call it (`embedpipe train` does when the section is missing).

    Args:
        config: the run's config.
        output_dir: the run directory.
        files: the input files the job read (default: what `input.path` matches now).
        elapsed: the job's seconds, when known.

    Returns:
        The `preprocess` manifest section.

    Raises:
        RunError: the job has not written its row counts (not finished, or failed).
        InputError: more rows were dead-lettered than `input.max_bad_fraction` allows.
    """
    path = layout.row_counts_path(output_dir)
    if not FileSystems.exists(path):
        raise layout.RunError(f"{path} does not exist: the preprocess job of {output_dir} has not finished")
    with FileSystems.open(path) as f:
        counts = json.loads(f.read())
    dead = {k[len("dead_letter_") :]: v for k, v in counts.items() if k.startswith("dead_letter_")}
    dead_letters = layout.dead_letter_pattern(output_dir)
    rows.check_bad_fraction(counts.get("read", 0), dead, config, dead_letters)  # before anything is published
    tft_output = tft.TFTransformOutput(layout.transform_dir(output_dir))
    specs = table_specs(config, tft_output)
    files = _input_files(config) if files is None else files
    section = {
        "config": {
            "name": config.name,
            "path": config.source,
            "sha256": config.digest(),
            "drift_limits": dataclasses.asdict(config.drift),  # what `embedpipe publish` checks
        },
        "inputs": {"path": config.input.path, "format": config.input.format, "files": files},
        "rows": {
            "read": counts.get("read", 0),
            "train": counts.get("train", 0),
            "eval": counts.get("eval", 0),
            "dead_letter": sum(dead.values()),
            "dead_letter_by_reason": dict(sorted(dead.items())),
        },
        **({"users_evaluated": counts.get("users_evaluated", 0)} if isinstance(config, CollaborativeConfig) else {}),
        "tables": {s.name: s.to_json_dict() for s in specs},
        "outputs": {
            "transform": layout.transform_dir(output_dir),
            "train": layout.examples_pattern(output_dir, TRAIN),
            "eval": layout.examples_pattern(output_dir, EVAL),
            "dead_letter": dead_letters,
            "id_counts": layout.id_counts_path(output_dir),
            "row_counts": path,
        },
        "timings_s": {} if elapsed is None else {"preprocess": round(elapsed, 2)},
    }
    r = section["rows"]
    if r["read"] != r["train"] + r["eval"] + r["dead_letter"]:
        raise RuntimeError(f"row counts do not add up: {r}")  # a bug, never an input problem
    _LOG.info(
        "preprocess: %d rows read -> %d train, %d eval, %d dead-lettered%s",
        r["read"],
        r["train"],
        r["eval"],
        r["dead_letter"],
        "" if elapsed is None else f" ({elapsed:.1f}s)",
    )
    update_manifest(output_dir, "preprocess", section)
    return section


def _input_files(config: DatasetConfig) -> list[str]:
    matches = FileSystems.match([config.input.path])[0].metadata_list
    if not matches:
        raise rows.InputError(f"input.path: no file matches {config.input.path!r} (config {config.source})")
    return [m.path for m in matches]

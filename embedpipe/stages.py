"""The stage commands and `embedpipe run`: config and run directory from the flags, then the stages.

    embedpipe run                                   # the bundled flights sample, DirectRunner
    embedpipe run --config flights --input data/flights.parquet --output out/flights --run-id 20261123
    embedpipe preprocess --config my.yaml --output ROOT --run-id ID --runner DataflowRunner --project P ...
    embedpipe train --config my.yaml --output ROOT --run-id ID
    embedpipe export --config my.yaml --output ROOT --run-id ID
    embedpipe publish --output ROOT --run-id ID     # point ROOT/LATEST at a finished run

Each function here is one command: it parses its argv (`embedpipe.args`), resolves the config and
the run directory (`resolve`), calls the stage (`pipeline.preprocess.preprocess`,
`trainer.train.train_any`, `trainer.export.export`; `embedpipe.runs.publish`), prints a short
summary and returns the stage's manifest section. `run_all` chains the three stages into one
versioned run (with a numeric-only baseline for a supervised config, and the run's report)
and publishes it. Tests and `deploy/` call these functions directly.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import logging
import os
import time

import pyarrow as pa

from embedpipe import args as cli_args
from embedpipe import runs
from pipeline.preprocess import finalize as finalize_preprocess
from pipeline.preprocess import preprocess as preprocess_job
from schemas import layout
from schemas.config import CollaborativeConfig, DatasetConfig
from schemas.errors import ConfigError
from schemas.loading import load_config
from schemas.manifest import read_manifest
from trainer.export import export as export_stage
from trainer.neighbors import showcase
from trainer.report import write_report
from trainer.tables import load_table
from trainer.train import train_any

_LOG = logging.getLogger("embedpipe")


def resolve(args: argparse.Namespace, allow_complete: bool = False) -> tuple[DatasetConfig, str]:
    """The config and the run directory that the shared flags (`add_run_arguments`) name.

    Without `--run-id` the run directory is `--output` itself (default
    `embedpipe_output/<config name>`); with it, `OUTPUT/runs/<id>/`, and `--warm-start` sets
    every table's `init_from` to the last published run's (`embedpipe.runs.warm_start`).

    Args:
        args: the parsed flags.
        allow_complete: accept a run that is already complete (`embedpipe run` re-publishes it);
            a stage command refuses one, since rewriting it would change what LATEST serves.

    Returns:
        (config, run directory).

    Raises:
        ConfigError: a bad config, or flags that do not fit it.
        RunError: a bad run id, or a complete run a stage would rewrite.
    """
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
    path = layout.run_dir(root, args.run_id)
    if not allow_complete and layout.is_complete(path):
        raise layout.RunError(f"{path} is a complete run; stages never rewrite one (use a new --run-id)")
    if getattr(args, "warm_start", False):
        config = runs.warm_start(config, root)
    return config, path


def preprocess(argv: list[str] | None = None, wait: bool = True) -> dict | None:
    """`embedpipe preprocess`: the Beam job; unrecognised flags are Beam pipeline options.

    Args:
        argv: the command line.
        wait: False for a Flex Template launch (`deploy/dataflow/main.py`): the job starts after
            this process exits, and `embedpipe train` finalises its manifest section.

    Returns:
        The `preprocess` manifest section (None when not waiting).
    """
    args, beam_args = cli_args.parse("preprocess", argv)
    config, output_dir = resolve(args)
    section = preprocess_job(config, output_dir, beam_args, wait=wait)
    if section is None:
        print(f"submitted the preprocess job of {output_dir}; `embedpipe train` finalises its manifest")
        return None
    print_rows(section["rows"])
    print(f"  outputs:   {layout.preprocess_dir(output_dir)}")
    return section


def train(argv: list[str] | None = None) -> dict:
    """`embedpipe train`: trains the run's model (`--baseline`: the numeric-only yardstick).

    After a preprocess job that was launched without waiting (a Flex Template), the `preprocess`
    section of the manifest is written first, from what the job wrote (`pipeline.preprocess.finalize`).

    Returns:
        The `train` (or `baseline`) manifest section.
    """
    args, _ = cli_args.parse("train", argv)
    config, output_dir = resolve(args)
    if "preprocess" not in read_manifest(output_dir):
        print_rows(finalize_preprocess(config, output_dir)["rows"])
    if args.baseline and isinstance(config, CollaborativeConfig):
        cli_args.train_parser().error("--baseline is for supervised configs (a collaborative run reports popularity)")
    section = train_any(config, output_dir, baseline=args.baseline, epochs=args.epochs)
    print(f"  model:     {section['model_dir']}")
    print_metric(section)
    return section


def export(argv: list[str] | None = None) -> dict:
    """`embedpipe export`: writes every table of the run's trained model.

    Returns:
        The `export` manifest section.
    """
    args, _ = cli_args.parse("export", argv)
    config, output_dir = resolve(args)
    section = export_stage(config, output_dir)
    print(f"  tables:    {section['dir']}  ({', '.join(section['tables'])})")
    return section


def run_all(argv: list[str] | None = None) -> dict:
    """`embedpipe run`: the three stages into `OUTPUT/runs/RUN_ID/`, then publish.

    A run id that is already complete with the same config is published again (when it is the
    latest) without recomputing anything.

    Returns:
        The run's manifest.
    """
    args, beam_args = cli_args.parse("run", argv)
    started = time.time()
    args.run_id = layout.check_run_id(args.run_id or layout.default_run_id())
    warm, args.warm_start = args.warm_start, False
    config, output_dir = resolve(args, allow_complete=True)
    root = layout.root_of(output_dir)
    digest = config.digest()  # of the config as asked for: what makes a re-run "the same run"
    if runs.prepare(root, args.run_id, digest):
        current = layout.latest(root)
        if current in (None, output_dir):
            runs.publish(root, args.run_id, digest)
            print(f"embedpipe run: {output_dir} is already complete with this config; published it again")
        else:  # an older run: re-running it must not move LATEST back
            print(f"embedpipe run: {output_dir} is already complete with this config; LATEST stays on {current}")
        return read_manifest(output_dir)
    if warm:
        config = runs.warm_start(config, root)
    _LOG.info("run: config %s -> %s%s", config.source, output_dir, " (warm start from LATEST)" if warm else "")
    rows = preprocess_job(config, output_dir, beam_args)["rows"]
    release_memory()
    trained = train_any(config, output_dir, epochs=args.epochs)
    supervised = not isinstance(config, CollaborativeConfig)
    baseline = (
        train_any(config, output_dir, baseline=True, epochs=args.epochs) if supervised and args.baseline else None
    )
    release_memory()
    exported = export_stage(config, output_dir)
    report = write_report(output_dir) if args.report else None  # before publishing: LATEST serves it too
    pointer = runs.publish(root, args.run_id, digest, config.drift, config.source)
    print(f"\nembedpipe run finished in {time.time() - started:.0f}s")
    print_rows(rows)
    print(f"  model:     {trained['model_dir']}")
    print(f"  tables:    {exported['dir']}  ({', '.join(exported['tables'])})")
    print(f"  manifest:  {os.path.join(output_dir, layout.MANIFEST)}")
    print(f"  latest:    {os.path.join(root, layout.LATEST)} -> {pointer['run_dir']}")
    print_neighbors(showcase_table(config, exported["tables"]))
    print_metric(trained, baseline)
    if report:
        print(f"  report:    {report}")
    if args.keep is not None:
        print_gc(runs.collect_garbage(root, args.keep))
    return read_manifest(output_dir)


def publish(argv: list[str] | None = None) -> dict:
    """`embedpipe publish --output ROOT --run-id ID`: the last task of a scheduled run.

    Returns:
        The pointer written to `ROOT/LATEST`.
    """
    args, _ = cli_args.parse("publish", argv)
    if args.config:
        config = load_config(args.config)
        pointer = runs.publish(
            args.output, args.run_id, drift_limits=config.drift, config_source=config.source, force=args.force
        )
    else:
        pointer = runs.publish(args.output, args.run_id, force=args.force)
    print(f"published {os.path.join(args.output, layout.LATEST)} -> {pointer['run_dir']}")
    if args.keep is not None:
        print_gc(runs.collect_garbage(args.output, args.keep))
    return pointer


def collect_garbage(argv: list[str] | None = None) -> dict:
    """`embedpipe gc --output ROOT --keep N`: old and abandoned runs deleted (`runs.collect_garbage`)."""
    args, _ = cli_args.parse("gc", argv)
    hours = runs.ABANDONED_HOURS if args.abandoned_hours is None else args.abandoned_hours
    result = runs.collect_garbage(args.output, args.keep, hours, dry_run=args.dry_run)
    print_gc(result)
    return result


def print_gc(result: dict) -> None:
    """What `collect_garbage` kept and deleted, one line each."""
    verb = "would delete" if result["dry_run"] else "deleted"
    print(f"gc: {verb} {len(result['deleted'])} run(s): {', '.join(result['deleted']) or '-'}")
    for run_id in result["kept"]:
        print(f"  kept {run_id}: {result['why'][run_id]}")


def release_memory() -> None:
    """Hands back to the OS what a finished stage freed: the stages of `embedpipe run` share one
    process, and without this glibc keeps the freed memory of one stage's peak through the next
    (about 0.3 GiB after the Beam job and after training at 5M interactions), and Arrow's
    allocator the pages it keeps for reuse."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    # The process's own symbols (libc's among them), not `ctypes.util.find_library("c")`: that
    # runs `ldconfig -p` in a forked child, an instant copy of this multi-GiB process.
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:  # glibc only
        trim(0)


def print_rows(rows: dict) -> None:
    """The row counts of a `preprocess` section, on one line."""
    print(
        f"  rows:      {rows['read']} read, {rows['train']} train, {rows['eval']} eval, "
        f"{rows['dead_letter']} dead-lettered"
    )


def showcase_table(config: DatasetConfig, tables: dict[str, str]) -> str | None:
    """The exported table whose neighbours a run's summary shows: a supervised config's first
    cross (else its first table), a collaborative config's item table."""
    if isinstance(config, CollaborativeConfig):
        name = config.item.name
    else:
        crosses = [f.name for f in config.categorical if f.is_cross]
        name = crosses[0] if crosses else next(iter(tables), None)
    return tables.get(name)


def print_neighbors(path: str | None, k: int = 5) -> None:
    """The nearest neighbours of two telling keys of the table at `path` (`neighbors.showcase`),
    one line each: `Tue x 8 ~ Wed x 8 0.99, Thu x 8 0.98, ...` (labels, e.g. titles, where the
    table has them)."""
    if path is None:
        return
    table = load_table(path)
    shown = showcase(table, k=k)
    if not shown:
        return
    print(f"  neighbours in {table.name} (cosine):")
    width = max(len(label or key) for key, label, _ in shown)
    for key, label, near in shown:
        print(f"    {label or key:<{width}} ~ " + ", ".join(f"{lab or k} {score:+.2f}" for k, lab, score in near))


def print_metric(section: dict, baseline: dict | None = None) -> None:
    """The headline metric of a `train` section (beside the baseline's, when given), then every
    eval metric."""
    metric = section["headline_metric"]
    best = f" (best model: {metric['model']})" if "model" in metric else ""
    if baseline is not None:
        base = baseline["headline_metric"]
        best += f"  vs. {base['value']:.4f} for the numeric-only baseline"
    print(f"  eval {metric['name']}: {metric['value']:.4f}{best}")
    metrics = section["eval_metrics"]
    # supervised: {metric: value}; collaborative: {model or "popularity": {metric: value}}
    for name, values in metrics.items() if isinstance(next(iter(metrics.values())), dict) else [("", metrics)]:
        print(f"    {name + ': ' if name else ''}" + ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items())))

"""The `embedpipe` command: preprocess, train, export, or all three with `run`.

    embedpipe run                                   # bundled taxi sample, DirectRunner
    embedpipe run --config flights --input data/flights.parquet --output out/flights --run-id 20261123
    embedpipe preprocess --config my.yaml --output ROOT --run-id ID --runner DataflowRunner --project P ...
    embedpipe publish --output ROOT --run-id ID     # point ROOT/LATEST at a finished run
    embedpipe example-data flights --output data/   # needs: pip install -e ".[flights]"

Each subcommand is a thin adapter over a module's `run(argv)` (`pipeline.preprocess`,
`trainer.train`, `trainer.export`, `pipeline.datasets`, ...); `embedpipe run` chains the three
stages into a versioned run directory and publishes it (`pipeline.runs`).
Beam pipeline options (`--runner`, `--direct_num_workers`, `--temp_location`, ...) pass through to
the preprocessing job. A bad config or input ends with one `embedpipe: error: ...` line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

COMMANDS = {
    "run": "preprocess, train and export in one go (no arguments: the bundled taxi sample)",
    "preprocess": "Beam/tf.Transform job: raw logs to TFRecords and a transform graph",
    "train": "train the embedding model on preprocessed data",
    "export": "write every embedding table of the trained model",
    "example-data": "write an example dataset (flights, watchlogs, movielens) as input for a bundled config",
    "neighbors": "nearest neighbours of keys (or labels) in an exported table; --all for every row",
    "recommend": "top items for users of a two-tower export",
    "clusters": "k-means clusters of an exported table",
    "report": "a self-contained HTML page of a run: summary, training curves, every table",
    "publish": "verify a versioned run (--output ROOT --run-id ID) and point ROOT/LATEST at it",
}
USAGE = "usage: embedpipe [-v] {" + ",".join(COMMANDS) + "} [--help] [options]"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nTurn raw event logs into learned, reusable embeddings.\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<13} {text}")
        print("\n-v/--verbose also shows Beam and TensorFlow logs; `embedpipe COMMAND --help` lists its options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{USAGE}\nembedpipe: error: unknown command {command!r}", file=sys.stderr)
        return 2
    _setup_logging(verbose)
    # Imported after logging is set up: TensorFlow and Beam take seconds to import, which
    # `embedpipe --help` should not pay.
    from pipeline.rows import InputError
    from pipeline.runs import RunError
    from schemas.config import ConfigError
    from trainer.tables import TableError

    try:
        return _dispatch(command, rest)
    except (ConfigError, InputError, TableError, RunError, FileNotFoundError) as e:
        print(f"embedpipe: error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # a key that is not in a table
        print(f"embedpipe: error: {e.args[0]}", file=sys.stderr)
        return 2


def _dispatch(command: str, argv: list[str]) -> int:
    if command == "preprocess":
        from pipeline import preprocess

        section = preprocess.run(argv)
        _print_rows(section["rows"])
        print(f"  outputs:   {os.path.dirname(section['outputs']['transform'])}")
    elif command == "train":
        from trainer import train

        section = train.run(argv)
        print(f"  model:     {section['model_dir']}")
        _print_metric(section)
    elif command == "export":
        from trainer import export

        section = export.run(argv)
        print(f"  tables:    {section['dir']}  ({', '.join(section['tables'])})")
    elif command == "example-data":
        from pipeline import datasets

        print(f"wrote {datasets.run(argv)}")
    elif command == "neighbors":
        from trainer import neighbors

        result = neighbors.run_neighbors(argv)
        if "all" in result:
            r = result["all"]
            print(f"wrote the top {r['k']} neighbours of {r['rows']} rows to {r['path']} ({r['seconds']}s)")
        _print_ranked(result.get("neighbors", {}))
    elif command == "recommend":
        from trainer import neighbors

        _print_ranked(neighbors.run_recommend(argv))
    elif command == "clusters":
        from trainer import neighbors

        r = neighbors.run_clusters(argv)
        print(f"wrote {r['clusters']} clusters of {r['rows']} rows to {r['path']} (sizes {r['sizes']})")
    elif command == "publish":
        publish(argv)
    elif command == "report":
        from trainer import report

        print(f"wrote {report.run(argv)}")
    else:
        run_all(argv)
    return 0


def run_all(argv: list[str] | None = None) -> dict:
    """`embedpipe run`: the three stages into OUTPUT/runs/RUN_ID/, then publish; returns the manifest."""
    from pipeline import preprocess as pre
    from pipeline import runs
    from pipeline.manifest import MANIFEST, read_manifest
    from trainer import export, train

    parser = argparse.ArgumentParser(
        prog="embedpipe run",
        description=COMMANDS["run"] + ". Unrecognised flags are passed to Beam as pipeline options.",
    )
    pre.add_arguments(parser)
    parser.add_argument("--epochs", type=int, help="maximum epochs (default: training.epochs of the config)")
    args, beam_args = parser.parse_known_args(argv)
    started = time.time()
    args.run_id = runs.check_run_id(args.run_id or runs.default_run_id())
    warm, args.warm_start = args.warm_start, False
    config, output_dir = pre.resolve(args, allow_complete=True)
    root = os.path.dirname(os.path.dirname(output_dir))
    log = logging.getLogger("embedpipe")
    digest = config.digest()  # of the config as asked for: what makes a re-run "the same run"
    if runs.prepare(root, args.run_id, digest):
        current = runs.latest(root)
        if current in (None, output_dir):
            runs.publish(root, args.run_id, digest)
            print(f"embedpipe run: {output_dir} is already complete with this config; published it again")
        else:  # an older run: re-running it must not move LATEST back
            print(f"embedpipe run: {output_dir} is already complete with this config; LATEST stays on {current}")
        return read_manifest(output_dir)
    if warm:
        config = runs.warm_start(config, root)
    log.info("run: config %s -> %s%s", config.source, output_dir, " (warm start from LATEST)" if warm else "")
    rows = pre.preprocess(config, output_dir, beam_args)["rows"]
    trained = train.train_any(config, output_dir, epochs=args.epochs)
    exported = export.export(config, output_dir)
    pointer = runs.publish(root, args.run_id, digest, config.drift, config.source)
    print(f"\nembedpipe run finished in {time.time() - started:.0f}s")
    _print_rows(rows)
    print(f"  model:     {trained['model_dir']}")
    print(f"  tables:    {exported['dir']}  ({', '.join(exported['tables'])})")
    print(f"  manifest:  {os.path.join(output_dir, MANIFEST)}")
    print(f"  latest:    {os.path.join(root, runs.LATEST)} -> {pointer['run_dir']}")
    _print_metric(trained)
    return read_manifest(output_dir)


def publish(argv: list[str] | None = None) -> dict:
    """`embedpipe publish --output ROOT --run-id ID`: the last task of a scheduled run."""
    from pipeline import runs
    from schemas.config import load_config

    parser = argparse.ArgumentParser(prog="embedpipe publish", description=COMMANDS["publish"])
    parser.add_argument("--output", required=True, help="the root that holds runs/<id>/ and LATEST")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--config", help="check this config's drift: limits (default: those the run recorded)")
    parser.add_argument("--force", action="store_true", help="allow pointing LATEST back at an older complete run")
    args = parser.parse_args(argv)
    if args.config:
        config = load_config(args.config)
        pointer = runs.publish(
            args.output, args.run_id, drift_limits=config.drift, config_source=config.source, force=args.force
        )
    elif args.force:
        pointer = runs.publish(args.output, args.run_id, force=True)
    else:
        pointer = runs.publish(args.output, args.run_id)
    print(f"published {os.path.join(args.output, runs.LATEST)} -> {pointer['run_dir']}")
    return pointer


def _print_ranked(results: dict) -> None:
    """{query: [(key, label, score), ...]} as one block per query."""
    for query, ranked in results.items():
        print(f"{query}:")
        for key, label, score in ranked:
            print(f"  {score:+.4f}  {key}" + (f"  {label}" if label and label != key else ""))


def _print_rows(rows: dict) -> None:
    print(
        f"  rows:      {rows['read']} read, {rows['train']} train, {rows['eval']} eval, "
        f"{rows['dead_letter']} dead-lettered"
    )


def _print_metric(section: dict) -> None:
    metric = section["headline_metric"]
    best = f" (best model: {metric['model']})" if "model" in metric else ""
    print(f"  eval {metric['name']}: {metric['value']:.4f}{best}")
    metrics = section["eval_metrics"]
    # supervised: {metric: value}; collaborative: {model or "popularity": {metric: value}}
    for name, values in (metrics.items() if isinstance(next(iter(metrics.values())), dict) else [("", metrics)]):
        print(f"    {name + ': ' if name else ''}" + ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items())))


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        for noisy in ("apache_beam", "absl", "tensorflow", "tensorflow_transform", "tfx_bsl", "h5py", "jax"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())

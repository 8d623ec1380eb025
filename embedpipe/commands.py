"""The commands around a run's outputs: example data in, neighbours, recommendations, clusters and
the report out.

    embedpipe example-data flights --output data/
    embedpipe neighbors EXPORT/item "Toy Story (1995)" -k 10      # or --all
    embedpipe recommend EXPORT u000123 -k 10
    embedpipe clusters EXPORT/item -k 50
    embedpipe report embedpipe_output/taxi

Each function is one command: it parses its argv (`embedpipe.args`), calls the library
(`pipeline.datasets`, `trainer.neighbors`, `trainer.report`), prints what it did and returns it.
"""

from __future__ import annotations

import os

from embedpipe import args as cli_args
from pipeline import datasets
from schemas.layout import resolve_run
from trainer import neighbors as nn
from trainer.report import write_report
from trainer.tables import load_table


def example_data(argv: list[str] | None = None) -> str:
    """`embedpipe example-data`: writes an example dataset; returns the path of its main file."""
    args, _ = cli_args.parse("example-data", argv)
    path = datasets.write_example(args.dataset, args.output, args.format)
    print(f"wrote {path}")
    return path


def neighbors(argv: list[str] | None = None) -> dict:
    """`embedpipe neighbors`: the neighbours of some keys, or of every row (`--all`).

    Returns:
        {"all": `write_all_neighbors` result} or {"neighbors": {key: [(key, label, score)]}}.
    """
    parser = cli_args.neighbors_parser()
    args = parser.parse_args(argv)
    if not args.keys and not args.all:
        parser.error("give one or more keys, or --all")
    table = load_table(args.table)
    if args.all:
        result = nn.write_all_neighbors(table, args.k, args.output or os.path.join(table.path, "neighbors.parquet"))
        print(
            f"wrote the top {result['k']} neighbours of {result['rows']} rows to {result['path']} ({result['seconds']}s)"
        )
        return {"all": result}
    index = nn.NeighborIndex(table)
    found = {key: index.neighbors(key, args.k) for key in args.keys}
    print_ranked(found)
    return {"neighbors": found}


def recommend(argv: list[str] | None = None) -> dict:
    """`embedpipe recommend`: top items per user of a two-tower export; {user: [(key, label, score)]}."""
    args, _ = cli_args.parse("recommend", argv)
    found = nn.recommend_users(args.export, args.users, args.k)
    print_ranked(found)
    return found


def clusters(argv: list[str] | None = None) -> dict:
    """`embedpipe clusters`: k-means clusters of a table into Parquet; the `write_clusters` result."""
    args, _ = cli_args.parse("clusters", argv)
    table = load_table(args.table)
    result = nn.write_clusters(table, args.k, args.output or os.path.join(table.path, "clusters.parquet"), args.seed)
    print(f"wrote {result['clusters']} clusters of {result['rows']} rows to {result['path']} (sizes {result['sizes']})")
    return result


def report(argv: list[str] | None = None) -> str:
    """`embedpipe report`: the HTML page of a run (or of a root's latest run); returns its path."""
    args, _ = cli_args.parse("report", argv)
    path = write_report(resolve_run(args.output_dir), args.out)
    print(f"wrote {path}")
    return path


def print_ranked(results: dict) -> None:
    """{query: [(key, label, score), ...]} as one block per query."""
    for query, ranked in results.items():
        print(f"{query}:")
        for key, label, score in ranked:
            print(f"  {score:+.4f}  {key}" + (f"  {label}" if label and label != key else ""))

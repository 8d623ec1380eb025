"""The commands around a run's outputs: example data in, neighbours, recommendations, clusters and
the report out.

    embedpipe example-data flights --output data/
    embedpipe neighbors EXPORT/item "Toy Story (1995)" -k 10      # or --all [--approximate]
    embedpipe recommend EXPORT u000123 -k 10                     # or --all
    embedpipe clusters EXPORT/item -k 50
    embedpipe report embedpipe_output/taxi

Each function is one command: it parses its argv (`embedpipe.args`), calls the library
(`pipeline.datasets`, `trainer.neighbors`, `trainer.recommender`, `trainer.report`), prints what it did and returns it.
"""

from __future__ import annotations

import os

from embedpipe import args as cli_args
from pipeline import datasets
from schemas.layout import resolve, resolve_run
from trainer import ann, recommender
from trainer import neighbors as nn
from trainer.report import write_report
from trainer.tables import load_table


def example_data(argv: list[str] | None = None) -> str:
    """`embedpipe example-data`: writes an example dataset; returns the path of its main file."""
    args, _ = cli_args.parse("example-data", argv)
    if args.sample is not None and args.dataset != "flights":
        cli_args.example_data_parser().error("--sample is for the flights example")
    path = datasets.write_example(args.dataset, args.output, args.format, args.sample)
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
    _check_approximate(parser, args)
    table = load_table(args.table)
    if args.all:
        index = ann.HnswIndex.load_or_build(table, "cosine") if args.approximate else None
        result = nn.write_all_neighbors(
            table, args.k, args.output or os.path.join(table.path, "neighbors.parquet"), index=index
        )
        how = "approximate, " if result["approximate"] else ""
        print(
            f"wrote the top {result['k']} neighbours of {result['rows']} rows to {result['path']} "
            f"({how}{result['seconds']}s)"
        )
        return {"all": result}
    index = nn.NeighborIndex(table)
    found = {key: index.neighbors(key, args.k) for key in args.keys}
    print_ranked(found)
    return {"neighbors": found}


def recommend(argv: list[str] | None = None) -> dict:
    """`embedpipe recommend`: top items of some users, or of every user (`--all`).

    Returns:
        {"all": `recommend_all` result} or {user: [(key, label, score)]}.
    """
    parser = cli_args.recommend_parser()
    args = parser.parse_args(argv)
    if not args.users and not args.all:
        parser.error("give one or more user keys, or --all")
    _check_approximate(parser, args)
    if args.all:
        index = None
        if args.approximate:
            index = ann.HnswIndex.load_or_build(load_table(os.path.join(resolve(args.export), "item")), "dot")
        result = recommender.recommend_all(args.export, args.k, args.output, index=index)
        how = "approximate, " if result["approximate"] else ""
        print(
            f"wrote the top {result['k']} items of {result['users']} users to {result['path']} "
            f"({how}{result['seconds']}s)"
        )
        return {"all": result}
    found = recommender.recommend_users(args.export, args.users, args.k)
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


def _check_approximate(parser, args) -> None:
    if args.approximate and not args.all:
        parser.error("--approximate goes with --all")
    if args.approximate and not ann.available():
        parser.error(ann.MISSING)


def print_ranked(results: dict) -> None:
    """{query: [(key, label, score), ...]} as one block per query."""
    for query, ranked in results.items():
        print(f"{query}:")
        for key, label, score in ranked:
            print(f"  {score:+.4f}  {key}" + (f"  {label}" if label and label != key else ""))

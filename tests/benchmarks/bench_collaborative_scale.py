"""The collaborative path at the mission's scale: a 500,000-movie catalogue, 1M to 20M interactions.

Not collected by pytest. Run from the repository root (2 cores, 24 GiB here):

    python tests/benchmarks/bench_collaborative_scale.py --scales 1 5 --epochs 1
    python tests/benchmarks/bench_collaborative_scale.py --scales 20 --epochs 1
    python tests/benchmarks/bench_collaborative_scale.py --scales 5 --epochs 1 --als   # + implicit's ALS

For each scale S (millions of interactions) it writes the synthetic watch logs of
`pipeline.synthetic.generate_watch_logs(S * 20_000 users, 500_000 items, mean_interactions=50)`
under OUTPUT/input-S (kept and reused), then runs, in a fresh process,

    embedpipe run --config watchlogs --input .../interactions.parquet --item-metadata .../items.parquet
        --output OUTPUT/run-S --run-id bench --epochs E

with the bundled `watchlogs` config's defaults, sampling the resident memory of the whole process
tree every 0.2 s. It reports the wall time, the peak RSS, each stage's time (preprocess, train,
evaluate, export: from the run manifest), the Beam job's interactions per second (rows read /
preprocess seconds), each model's examples per second over its epochs, and the quality figures.
`--als` also times implicit's ALS (64 factors, 15 iterations, the `bench` extra) on the same
interactions (user x item counts, all of them); `--recommend` times `embedpipe recommend
RUN/export --all -k 20`, exact and `--approximate` (the `ann` extra; the index build included),
each in a fresh process with its peak RSS. `--user-chunk N` runs a copy of the config with
`training.user_chunk: N` (bag_of_history's chunked pairs); `--top-k N` one with both vocabularies
capped at N (`interactions.user/item.top_k`), so that every scale trains tables of the same size:
what then still grows with the scale grows with the interactions, not with the model. Results go
to OUTPUT/results.json as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import yaml

from schemas.loading import resolve_config_path

DEFAULT_OUTPUT = "/tmp/embedpipe_bench_scale"
ITEMS = 500_000
MEAN_INTERACTIONS = 50


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and all its descendants (from /proc)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def make_input(scale: float, output: str) -> tuple[str, str]:
    from pipeline import synthetic

    folder = os.path.join(output, f"input-{scale:g}")
    paths = (os.path.join(folder, "interactions.parquet"), os.path.join(folder, "items.parquet"))
    if all(os.path.exists(p) for p in paths):
        return paths
    started = time.time()
    logs = synthetic.generate_watch_logs(
        int(scale * 1e6 / MEAN_INTERACTIONS), ITEMS, mean_interactions=MEAN_INTERACTIONS
    )
    written = synthetic.write_watch_logs(logs, folder)
    print(f"input x{scale:g}: {logs.interactions.num_rows:,} interactions written in {time.time() - started:.0f}s")
    return written


def measure(command: list[str], log_path: str) -> dict:
    """Runs `command` in a fresh process, its output to `log_path`, sampling the resident memory
    of its whole process tree every 0.2 s: {"wall_s", "peak_rss_gib", "peak_at_s", "samples"}."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    peak, samples = [0], []
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

        def sample():
            while process.poll() is None:
                rss = tree_rss_bytes(process.pid)
                peak[0] = max(peak[0], rss)
                samples.append((round(time.time() - started, 1), rss))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        process.wait()
        sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command[2:5])} failed ({process.returncode}); see {log_path}")
    at = max(samples, key=lambda s: s[1])[0] if samples else 0
    return {
        "wall_s": round(time.time() - started, 1),
        "peak_rss_gib": round(peak[0] / 2**30, 2),
        "peak_at_s": at,
        "samples": samples,
    }


def config_with(out: str, user_chunk: int | None, top_k: int | None = None) -> str:
    """The bundled `watchlogs` config, or a copy of it beside OUT with `training.user_chunk` and
    both vocabularies' `top_k`."""
    if user_chunk is None and top_k is None:
        return "watchlogs"
    with open(resolve_config_path("watchlogs")) as f:
        raw = yaml.safe_load(f)
    if user_chunk is not None:
        raw["training"]["user_chunk"] = user_chunk
    if top_k is not None:
        for side in ("user", "item"):
            raw["interactions"][side]["top_k"] = top_k
    path = f"{out}.watchlogs.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def run_embedpipe(
    interactions: str, items: str, out: str, epochs: int, user_chunk: int | None = None, top_k: int | None = None
) -> dict:
    run_id = "bench"
    command = [
        sys.executable, "-m", "embedpipe.cli", "run", "--config", config_with(out, user_chunk, top_k), "--input", interactions,
        "--item-metadata", items, "--output", out, "--run-id", run_id, "--epochs", str(epochs),
    ]  # fmt: skip
    if os.path.exists(os.path.join(out, "runs", run_id)):
        subprocess.run(["rm", "-rf", os.path.join(out, "runs", run_id), os.path.join(out, "LATEST")], check=True)
    result = measure(command, out + ".log")
    with open(os.path.join(out, "runs", run_id, "manifest.json")) as f:
        manifest = json.load(f)
    with open(out + ".rss.json", "w") as f:
        json.dump(result.pop("samples"), f)
    return {**result, "manifest": manifest, "log": out + ".log"}


def recommend_all(out: str, approximate: bool) -> dict:
    """`embedpipe recommend RUN/export --all -k 20` (exact or `--approximate`) in a fresh process."""
    export = os.path.join(out, "runs", "bench", "export")
    command = [sys.executable, "-m", "embedpipe.cli", "recommend", export, "--all", "-k", "20"]
    name = "approximate" if approximate else "exact"
    result = measure(command + (["--approximate"] if approximate else []), f"{out}.recommend-{name}.log")
    result.pop("samples")
    return result


def als_fit_seconds(interactions: str) -> float:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import scipy.sparse as sp
    from implicit.als import AlternatingLeastSquares

    table = pq.read_table(interactions, columns=["user", "item"])
    users = pc.dictionary_encode(table.column("user")).combine_chunks()
    items = pc.dictionary_encode(table.column("item")).combine_chunks()
    rows, cols = users.indices.to_numpy(), items.indices.to_numpy()
    matrix = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, cols)), shape=(len(users.dictionary), len(items.dictionary))
    )
    model = AlternatingLeastSquares(factors=64, iterations=15, random_state=0)
    started = time.time()
    model.fit(matrix, show_progress=False)
    return round(time.time() - started, 1)


def summary(scale: float, result: dict) -> dict:
    m = result["manifest"]
    pre, train = m["preprocess"], m["train"]
    timings = {**pre["timings_s"], **train["timings_s"], **m["export"]["timings_s"]}
    best = train["best_model"]
    return {
        "scale_millions": scale,
        "interactions": pre["rows"]["read"],
        "wall_s": result["wall_s"],
        "peak_rss_gib": result["peak_rss_gib"],
        "peak_rss_at_s": result["peak_at_s"],
        "stage_s": timings,
        "beam_interactions_per_s": round(pre["rows"]["read"] / pre["timings_s"]["preprocess"]),
        "examples_per_s": train.get("examples_per_s"),
        "best_model": best,
        "test": {
            name: {k: round(v, 4) for k, v in metrics.items() if k.endswith("@20")}
            for name, metrics in train["eval_metrics"].items()
        },
        "eval_users": train.get("evaluation", {}).get("users"),
    }


def machine() -> str:
    """The CPU model and count, for reading a run's rates: they move 2-3x between machines of
    one kind (see docs/performance.md)."""
    if not os.path.exists("/proc/cpuinfo"):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    with open("/proc/cpuinfo") as f:
        info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    vector = "AVX-512" if "avx512f" in info.get("flags", "").split() else "no AVX-512"
    mhz = float(info.get("cpu MHz", 0))
    return f"{info.get('model name', platform.machine())} at {mhz / 1000:.1f} GHz ({vector}), {os.cpu_count()} CPUs"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 5], help="millions of interactions")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--als", action="store_true", help="also time implicit's ALS on the same interactions")
    parser.add_argument(
        "--recommend",
        action="store_true",
        help="also time `recommend --all -k 20`, exact and --approximate (ann extra)",
    )
    parser.add_argument("--user-chunk", type=int, help="override training.user_chunk of the watchlogs config")
    parser.add_argument("--top-k", type=int, help="cap both vocabularies at N rows (tables of one size at every scale)")
    args = parser.parse_args(argv)
    results = []
    for scale in args.scales:
        interactions, items = make_input(scale, args.output)
        out = os.path.join(args.output, f"run-{scale:g}")
        result = run_embedpipe(interactions, items, out, args.epochs, args.user_chunk, args.top_k)
        row = {**summary(scale, result), "machine": machine()}
        if args.als:
            row["als_fit_s"] = als_fit_seconds(interactions)
        if args.recommend:
            row["recommend_all"] = {"exact": recommend_all(out, False), "approximate": recommend_all(out, True)}
        results.append(row)
        print(json.dumps(row, indent=1))
    path = os.path.join(args.output, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'scale':>6} {'wall s':>7} {'peak GiB':>9} {'Beam inter/s':>13} {'ex/s per model':>30}  best test R@20")
    for r in results:
        print(
            f"{r['scale_millions']:>5g}M {r['wall_s']:>7.0f} {r['peak_rss_gib']:>9.2f} {r['beam_interactions_per_s']:>13,}"
            f" {json.dumps(r['examples_per_s']):>30}  {r['best_model']} {r['test'][r['best_model']]['recall@20']}"
        )
    if len(results) > 1:
        print(
            f"peak RSS ratio {results[-1]['peak_rss_gib'] / results[0]['peak_rss_gib']:.2f}x ({results[-1]['scale_millions']:g}M vs {results[0]['scale_millions']:g}M)"
        )
    print(f"machine: {machine()}\nresults: {path}")


if __name__ == "__main__":
    main()

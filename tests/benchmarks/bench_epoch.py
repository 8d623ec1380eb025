"""One training epoch of a collaborative model on an existing preprocessed run: examples/s.

Not collected by pytest. Run from the repository root on a run the scale benchmark (or
`embedpipe preprocess --config watchlogs ... --run-id bench`) has preprocessed:

    python tests/benchmarks/bench_epoch.py RUN_DIR --models two_tower bag_of_history
    python tests/benchmarks/bench_epoch.py RUN_DIR --models bag_of_history --user-chunk 8
    python tests/benchmarks/bench_epoch.py RUN_DIR --models bag_of_history --parts

It runs `trainer.retrieval.fit` for `--epochs` epochs on every training pair (no validation
slice, as the refit does) with the run's tables and the config's defaults, `--user-chunk`
overriding `training.user_chunk`, and prints each model's examples per second and epoch losses:
the training step and its input pipeline alone, without Beam, evaluation or export.

`--parts` times instead where one step's time goes (pairs, no chunks): the input pipeline alone
(pairs/s), then, on `--batches` batches read beforehand, the query alone, query + loss, + the
gradients, + the gradients' deduplication (`trainer.sparse.deduplicate`), and the whole step
with the update, each in ms per step (a traced function per part, two warm-up calls each).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from schemas.loading import load_config  # noqa: E402
from schemas.manifest import read_manifest  # noqa: E402
from schemas.tables import TableSpec  # noqa: E402
from trainer import retrieval  # noqa: E402
from trainer.sparse import deduplicate  # noqa: E402


def step_parts(model, name: str, data, batches: int) -> None:
    """Prints the input pipeline's pairs/s and each part of one step's ms (see the docstring)."""
    needs_history = not isinstance(model, retrieval.TwoTower)
    dataset = data.pairs(0, validation=False, with_history=needs_history)
    started, pairs = time.time(), 0
    for batch in dataset.take(3 * batches):
        pairs += int(tf.math.count_nonzero(batch["valid"]))
    print(f"{name} input pipeline alone: {pairs / (time.time() - started):,.0f} pairs/s")
    cached = list(dataset.take(batches))
    optimizer = retrieval.training_optimizer(data.config.training.learning_rate)

    def gradients(batch):
        with tf.GradientTape() as tape:
            loss = retrieval.batch_loss(model, batch, data.log_q)
        return tape.gradient(loss, model.trainable_variables)

    parts = {
        "query": lambda b: tf.reduce_sum(model.query(b["user"], b["history"])),
        "query + loss": lambda b: retrieval.batch_loss(model, b, data.log_q),
        "+ gradients": lambda b: [g.values if isinstance(g, tf.IndexedSlices) else g for g in gradients(b)],
        "+ deduplication": lambda b: [
            deduplicate(g)[0] if isinstance(g, tf.IndexedSlices) else g for g in gradients(b)
        ],
        "whole step": lambda b: optimizer.apply(gradients(b), model.trainable_variables),
    }
    for part, fn in parts.items():
        traced = tf.function(fn)
        for batch in cached[:2]:  # traced, and the optimizer's slots built
            traced(batch)
        started = time.time()
        for batch in cached[2:]:
            traced(batch)
        print(f"{name} {part}: {(time.time() - started) / (len(cached) - 2) * 1000:.2f} ms/step")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a preprocessed run directory (RUNS_ROOT/runs/ID)")
    parser.add_argument("--config", default="watchlogs")
    parser.add_argument("--models", nargs="+", default=["two_tower", "bag_of_history"])
    parser.add_argument("--user-chunk", type=int, help="override training.user_chunk")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--parts", action="store_true", help="time the parts of one step instead of epochs")
    parser.add_argument("--batches", type=int, default=100, help="with --parts: batches timed")
    args = parser.parse_args(argv)
    if args.parts and (args.user_chunk or 1) > 1:
        parser.error("--parts times pair batches; it takes no --user-chunk")
    config = load_config(args.config)
    if args.user_chunk is not None:
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, user_chunk=args.user_chunk))
    tables = read_manifest(args.run)["preprocess"]["tables"]
    data = retrieval.Data(config, args.run, {k: TableSpec.from_json_dict(v) for k, v in tables.items()})
    for name in args.models:
        model = retrieval.build(name, data.users, data.items, config.max_history)
        if args.parts:
            step_parts(model, name, data, args.batches)
            continue
        result = retrieval.fit(model, name, data, epochs=args.epochs, validate=False)
        losses = ", ".join(f"{x:.4f}" for x in result["losses"])
        print(
            f"{name} user_chunk={config.training.user_chunk}: {result['examples_per_s']:,.0f} examples/s, losses {losses}"
        )


if __name__ == "__main__":
    main()

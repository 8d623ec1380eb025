"""Training-step time vs. embedding-table size: plain Keras 3 Adam vs. `trainer.sparse`.

Not collected by pytest. Run from the repository root:

    python tests/benchmarks/bench_sparse_step.py
    python tests/benchmarks/bench_sparse_step.py --algorithm lazy_adam --items 5000 500000

The model is a minimal two-tower retrieval model: a user table (fixed size) followed by a small
Dense "tower", an item table whose row count varies, dim 32, batch 1024, in-batch softmax
(logits = user_vecs @ item_vecs.T, label = the diagonal). Ids are uniform random (the worst case
for caches; real, skewed ids touch fewer distinct rows). Each optimizer runs the same
`tf.function` step; warm-up steps (tracing, slot creation) are excluded, then the configurations
are timed in interleaved rounds so that machine noise hits them alike. Reported: the median step
time per configuration and the ratio largest/smallest table for each variant; the requirement
is a ratio <= 1.2 for the sparse path.

Variants: `keras_adam` (stock `keras.layers.Embedding` + `keras.optimizers.Adam`), `sparse`
(`trainer.sparse.SparseEmbedding` + `SparseAwareOptimizer`, the fix) and `sparse_opt_only`
(stock `keras.layers.Embedding` + `SparseAwareOptimizer`: shows the copy-on-read cost that
`SparseEmbedding` avoids, see the `trainer.sparse` docstring).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.sparse import SparseAwareOptimizer, SparseEmbedding  # noqa: E402

# name: (embedding layer class, optimizer kind)
VARIANTS = {
    "keras_adam": (keras.layers.Embedding, "keras_adam"),  # plain Keras 3
    "sparse": (SparseEmbedding, "sparse"),  # the fix: trainer.sparse, both parts
    "sparse_opt_only": (keras.layers.Embedding, "sparse"),  # sparse optimizer, stock Embedding
}


class TwoTower(keras.Model):
    def __init__(self, users: int, items: int, dim: int, embedding=keras.layers.Embedding):
        super().__init__()
        self.user_table = embedding(users, dim, name="user_embedding")
        self.user_tower = keras.layers.Dense(dim, name="user_tower")
        self.item_table = embedding(items, dim, name="item_embedding")

    def call(self, user_ids, item_ids):
        u = self.user_tower(self.user_table(user_ids))
        v = self.item_table(item_ids)
        return tf.matmul(u, v, transpose_b=True)  # [batch, batch] in-batch softmax logits


def make_step(model: TwoTower, optimizer):
    variables = model.trainable_variables

    @tf.function
    def step(user_ids, item_ids):
        with tf.GradientTape() as tape:
            logits = model(user_ids, item_ids)
            labels = tf.range(tf.shape(logits)[0])
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    return step


def make_optimizer(kind: str, algorithm: str):
    if kind == "keras_adam":
        return keras.optimizers.Adam(1e-3)
    lr = 0.05 if algorithm == "adagrad" else 1e-3
    return SparseAwareOptimizer(lr, dense_optimizer=keras.optimizers.Adam(1e-3), algorithm=algorithm)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, nargs="+", default=[5_000, 500_000])
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--algorithm", choices=["adagrad", "lazy_adam"], default="adagrad")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="timed steps per configuration per round")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    configs = {}
    for variant in args.variants:
        embedding, kind = VARIANTS[variant]
        for items in args.items:
            model = TwoTower(args.users, items, args.dim, embedding)
            batches = [
                (
                    tf.constant(rng.integers(0, args.users, args.batch), tf.int64),
                    tf.constant(rng.integers(0, items, args.batch), tf.int64),
                )
                for _ in range(32)
            ]
            model(*batches[0])  # build
            step = make_step(model, make_optimizer(kind, args.algorithm))
            for i in range(args.warmup):
                step(*batches[i % len(batches)]).numpy()
            configs[(variant, items)] = (step, batches, [])

    for _ in range(args.rounds):
        for step, batches, times in configs.values():
            for i in range(args.steps):
                user_ids, item_ids = batches[i % len(batches)]
                started = time.perf_counter()
                step(user_ids, item_ids).numpy()
                times.append(time.perf_counter() - started)

    print(
        f"two-tower in-batch softmax: users {args.users:,}, dim {args.dim}, batch {args.batch}; "
        f"median of {args.rounds * args.steps} steps after {args.warmup} warm-up; "
        f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"sparse algorithm: {args.algorithm}")
    for variant in args.variants:
        medians = {items: 1e3 * float(np.median(configs[(variant, items)][2])) for items in args.items}
        cells = "  ".join(f"{items:>9,} items: {ms:7.2f} ms" for items, ms in medians.items())
        ratio = medians[max(args.items)] / medians[min(args.items)]
        print(f"{variant:<16} {cells}   ratio {max(args.items):,}/{min(args.items):,}: {ratio:.2f}x")


if __name__ == "__main__":
    main()

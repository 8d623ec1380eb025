"""trainer.sparse: row-wise updates touch only the batch's rows, accumulate duplicate ids like the
dense gradient, learn, and work with tf.function, Keras fit and tf.train.Checkpoint."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.sparse import SparseAwareOptimizer, SparseEmbedding

ALGORITHMS = ["adagrad", "lazy_adam"]


def _toy(rows=50, dim=3, seed=0):
    """A table, a dense layer on top, and a tf.function step: loss = sum((dense(emb(ids)) - y)^2)."""
    keras.utils.set_random_seed(seed)
    table = SparseEmbedding(rows, dim, name="table")
    head = keras.layers.Dense(1, name="head")
    head(table(tf.constant([0])))
    variables = table.trainable_variables + head.trainable_variables
    return table, head, variables


def _step_fn(table, head, variables, opt, densify=False):
    @tf.function
    def step(ids, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(tf.squeeze(head(table(ids)), -1) - y))
        grads = tape.gradient(loss, variables)
        if densify:
            grads = [tf.convert_to_tensor(g) for g in grads]
        opt.apply(grads, variables)
        return loss

    return step


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_only_rows_in_the_batch_change(algorithm):
    table, head, variables = _toy()
    opt = SparseAwareOptimizer(0.1, dense_optimizer=keras.optimizers.Adam(0.01), algorithm=algorithm)
    step = _step_fn(table, head, variables, opt)
    ids = tf.constant([3, 7, 7, 20, 3], tf.int64)
    before = table.embeddings.numpy().copy()
    head_before = head.kernel.numpy().copy()

    step(ids, tf.constant([1.0, -1.0, 2.0, 0.5, 3.0]))

    after = table.embeddings.numpy()
    touched = np.zeros(len(before), bool)
    touched[[3, 7, 20]] = True
    assert np.array_equal(after[~touched], before[~touched])  # bitwise
    assert (after[touched] != before[touched]).all()
    for name, slot in opt.slots(table.embeddings).items():
        initial = 0.1 if name == "accumulator" else 0.0
        slot = slot.numpy()
        assert np.array_equal(slot[~touched], np.full_like(slot[~touched], initial)), name
        assert (slot[touched] != initial).all(), name
    # the dense layer went through the dense optimizer
    assert not np.array_equal(head.kernel.numpy(), head_before)
    assert int(opt.dense_optimizer.iterations) == 1 and int(opt.iterations) == 1
    assert isinstance(opt.dense_optimizer, keras.optimizers.Adam)


def _reference(algorithm, batches, table0, head_kernel, head_bias, lr=0.1, acc0=0.1, b1=0.9, b2=0.999, eps=1e-7):
    """The same algorithm on a dense table in numpy; the gradient comes from a dense tf tensor
    (duplicate ids summed by TF's dense gradient), only the head is frozen."""
    table = table0.astype(np.float64)
    acc = np.full_like(table, acc0)
    m, v = np.zeros_like(table), np.zeros_like(table)
    for t, (ids, y) in enumerate(batches, start=1):
        dense = tf.constant(table, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(dense)
            pred = tf.squeeze(tf.matmul(tf.gather(dense, ids), head_kernel) + head_bias, -1)
            loss = tf.reduce_sum(tf.square(pred - y))
        g = tf.convert_to_tensor(tape.gradient(loss, dense)).numpy().astype(np.float64)
        if algorithm == "adagrad":  # dense Adagrad: rows with g == 0 do not move anyway
            acc += g * g
            table -= lr * g / np.sqrt(acc + eps)
        else:  # lazy Adam: only rows present in the batch
            rows = np.unique(ids)
            m[rows] += (g[rows] - m[rows]) * (1 - b1)
            v[rows] += (g[rows] ** 2 - v[rows]) * (1 - b2)
            alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
            table[rows] -= alpha * m[rows] / (np.sqrt(v[rows]) + eps)
    return table


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_duplicate_ids_accumulate_like_the_dense_gradient(algorithm):
    table, head, _ = _toy(rows=6, dim=2, seed=1)
    opt = SparseAwareOptimizer(0.1, algorithm=algorithm)
    step = _step_fn(table, head, table.trainable_variables, opt)  # head frozen: table only
    batches = [
        (np.array([1, 1, 4, 1, 0]), np.array([1.0, 2.0, -1.0, 0.5, 3.0], np.float32)),
        (np.array([4, 4, 2]), np.array([0.0, 1.0, -2.0], np.float32)),
        (np.array([1, 5, 1, 1]), np.array([2.0, 1.0, -1.0, 1.0], np.float32)),
    ]
    expected = _reference(algorithm, batches, table.embeddings.numpy(), head.kernel.numpy(), head.bias.numpy())
    for ids, y in batches:
        step(tf.constant(ids), tf.constant(y))
    np.testing.assert_allclose(table.embeddings.numpy(), expected, rtol=1e-5, atol=1e-6)
    # and applying each id occurrence as its own update would give something else
    assert not np.allclose(
        _reference(
            algorithm,
            [(np.array([1]), np.array([1.0], np.float32))] * 3,
            expected,
            head.kernel.numpy(),
            head.bias.numpy(),
        ),
        expected,
    )


def test_sparse_adagrad_equals_keras_adagrad():
    """Sparse Adagrad is not an approximation: the whole table matches Keras' Adagrad fed dense
    gradients. (Fed the IndexedSlices, Keras' Adagrad squares each occurrence of a repeated id
    separately, so it would differ on the duplicated rows.)"""
    results = []
    for sparse in (True, False):
        table, head, variables = _toy(rows=20, dim=4, seed=2)
        opt = (
            SparseAwareOptimizer(0.1, dense_optimizer=keras.optimizers.Adagrad(0.1))
            if sparse
            else keras.optimizers.Adagrad(0.1)
        )
        step = _step_fn(table, head, variables, opt, densify=not sparse)
        for ids in ([1, 2, 2, 9], [9, 9, 9, 0], [5, 1, 17, 17]):
            step(tf.constant(ids), tf.constant([1.0, -1.0, 0.5, 2.0]))
        results.append(table.embeddings.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matrix_factorisation_learns(algorithm):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    users, items, rank = 40, 60, 3
    truth = rng.normal(size=(users, rank)) @ rng.normal(size=(rank, items))
    u, i = np.nonzero(rng.random((users, items)) < 0.6)
    ratings = truth[u, i].astype(np.float32)
    user_table = SparseEmbedding(users, 8, embeddings_initializer=keras.initializers.RandomNormal(stddev=0.3))
    item_table = SparseEmbedding(items, 8, embeddings_initializer=keras.initializers.RandomNormal(stddev=0.3))
    bias = keras.layers.Dense(1)  # a dense variable next to the tables
    user_table.build(), item_table.build(), bias.build((None, 1))
    variables = user_table.trainable_variables + item_table.trainable_variables + bias.trainable_variables
    lr = 0.1 if algorithm == "adagrad" else 0.05
    opt = SparseAwareOptimizer(lr, dense_optimizer=keras.optimizers.Adam(0.01), algorithm=algorithm)

    @tf.function
    def step(u, i, r):
        with tf.GradientTape() as tape:
            dot = tf.reduce_sum(user_table(u) * item_table(i), -1, keepdims=True)
            loss = tf.reduce_mean(tf.square(tf.squeeze(bias(dot), -1) - r))
        opt.apply(tape.gradient(loss, variables), variables)
        return loss

    u, i, r = tf.constant(u), tf.constant(i), tf.constant(ratings)
    losses = [float(step(u, i, r)) for _ in range(250)]
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_sparse_embedding_reads_only_looked_up_rows():
    """SparseEmbedding == keras Embedding in output, but its table is never read densely (a dense
    read copies the whole table once the variable has had a sparse update)."""
    table = SparseEmbedding(30, 4, name="t")
    table.build()
    stock = keras.layers.Embedding(30, 4)
    stock.build()
    stock.set_weights(table.get_weights())
    ids = tf.constant([[0, 5], [29, -1]], tf.int64)
    np.testing.assert_array_equal(table(ids).numpy(), stock(ids).numpy())

    @tf.function
    def step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(table(ids))
        grad = tape.gradient(loss, table.embeddings)
        assert isinstance(grad, tf.IndexedSlices)
        return grad.values

    graph = step.get_concrete_function(ids).graph
    handle = table.embeddings.value.handle
    (inner,) = [internal for external, internal in graph.captures if external is handle]
    consumers = {op.type for op in inner.consumers()}
    assert "ResourceGather" in consumers and "ReadVariableOp" not in consumers, consumers


def test_keras_fit_and_config_round_trip():
    keras.utils.set_random_seed(0)
    ids = keras.Input(shape=(), dtype="int64")
    out = keras.layers.Dense(1)(SparseEmbedding(100, 4, name="e")(ids))
    model = keras.Model(ids, out)
    opt = SparseAwareOptimizer(0.1, dense_optimizer=keras.optimizers.Adam(0.01), algorithm="lazy_adam")
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    x = np.arange(100).repeat(4)
    y = (x % 5).astype(np.float32)
    history = model.fit(x, y, epochs=4, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert set(opt.slots(model.get_layer("e").embeddings)) == {"m", "v"}

    clone = SparseAwareOptimizer.from_config(opt.get_config())
    assert clone.algorithm == "lazy_adam" and isinstance(clone.dense_optimizer, keras.optimizers.Adam)
    assert float(clone.dense_optimizer.learning_rate) == pytest.approx(0.01)
    assert float(clone.learning_rate) == pytest.approx(0.1)


def test_checkpoint_restores_the_lazily_created_slots(tmp_path):
    batch = (tf.constant([1, 2, 2, 9]), tf.constant([1.0, -1.0, 0.5, 2.0]))
    runs, path = [], None
    for restore in (False, True):
        table, head, variables = _toy(rows=12, dim=2, seed=3)
        opt = SparseAwareOptimizer(0.1, algorithm="lazy_adam")
        step = _step_fn(table, head, variables, opt)
        ckpt = tf.train.Checkpoint(table=table, head=head, opt=opt)
        if restore:
            ckpt.restore(path).assert_existing_objects_matched()  # slots created, then restored
        else:
            step(*batch)
            path = ckpt.save(str(tmp_path / "ckpt"))
        step(*batch)
        runs.append((table.embeddings.numpy(), opt.slots(table.embeddings)["m"].numpy(), int(opt.iterations)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2] == 2


def test_rejects_what_it_cannot_do_sparsely():
    with pytest.raises(ValueError, match="clipnorm"):
        SparseAwareOptimizer(0.1, clipnorm=1.0)
    with pytest.raises(ValueError, match="dense_optimizer.*clipnorm"):
        SparseAwareOptimizer(0.1, dense_optimizer=keras.optimizers.Adam(0.01, clipnorm=1.0))
    with pytest.raises(ValueError, match="algorithm"):
        SparseAwareOptimizer(0.1, algorithm="sgd")
    table = SparseEmbedding(10, 2, embeddings_constraint=keras.constraints.NonNeg())
    table.build()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(table(tf.constant([1])))
    with pytest.raises(ValueError, match="constraint"):
        SparseAwareOptimizer(0.1).apply(tape.gradient(loss, [table.embeddings]), [table.embeddings])

"""The Keras model from plain sizes: tables are named, sized as asked, and learn a planted signal."""

import keras
import numpy as np

from trainer.model import Table, build_model, embedding_layer_name


def test_tables_have_configured_shapes_and_names():
    model = build_model([Table("a", 11, 3), Table("a_x_b", 40, 5)], ["x"], "multiclass", num_classes=4)
    assert model.get_layer(embedding_layer_name("a")).get_weights()[0].shape == (11, 3)
    assert model.get_layer(embedding_layer_name("a_x_b")).get_weights()[0].shape == (40, 5)
    out = model({"a": np.array([1, 2]), "a_x_b": np.array([0, 39]), "x": np.array([0.5, -1.0], "float32")})
    assert out.shape == (2, 4)
    np.testing.assert_allclose(np.sum(out, axis=1), 1.0, rtol=1e-5)


def test_embedding_learns_which_ids_are_positive():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, size=4000)
    y = (ids % 2).astype("float32")[:, None]  # odd ids are positive
    model = build_model([Table("item", 20, 2)], [], "binary", hidden_units=(8,), learning_rate=0.02)
    model.fit({"item": ids}, y, batch_size=128, epochs=8, verbose=0)
    metrics = model.evaluate({"item": ids}, y, verbose=0, return_dict=True)
    assert metrics["accuracy"] > 0.95
    # The learned table separates odd from even ids: each id is nearer its own class's centroid.
    table = model.get_layer(embedding_layer_name("item")).get_weights()[0]
    odd, even = table[1::2].mean(axis=0), table[0::2].mean(axis=0)
    nearer_own = [
        np.linalg.norm(v - (odd if i % 2 else even)) < np.linalg.norm(v - (even if i % 2 else odd))
        for i, v in enumerate(table)
    ]
    assert all(nearer_own)

"""The Keras model: one embedding table per categorical feature and cross, a small DNN head.

`build_model` takes plain numbers (table sizes, dimensions, feature names), so it is unit-testable
without any tf.Transform artifacts; `trainer.train` reads those numbers from the transform output.
Each table is the layer named `<feature>_embedding` (see `embedding_layer_name`). A table
built with `trainable=False` is frozen (a `keras.layers.Embedding` with `trainable=False`: no
gradient, no optimizer slot, bit-for-bit unchanged by `fit`); `set_table_rows` overwrites rows of
a built table, e.g. with vectors from an exported table (transfer learning, see `trainer.train`).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np


@dataclass(frozen=True)
class Table:
    """One embedding table of the model: `rows` x `dim`, frozen when not `trainable`."""

    name: str
    rows: int
    dim: int
    trainable: bool = True


def embedding_layer_name(table: str) -> str:
    """The name of a table's layer in the Keras model."""
    return f"{table}_embedding"


def build_model(
    tables: list[Table],
    numeric: list[str],
    task: str,
    *,
    num_classes: int = 2,
    hidden_units: tuple[int, ...] = (64, 32),
    learning_rate: float = 0.003,
    loss: str | None = None,
) -> keras.Model:
    """A compiled model over int64 id inputs (one per table) and float32 numeric inputs.

    Args:
        tables: the embedding tables; input `<name>` is int64 [batch], rows of table `<name>`.
        numeric: numeric features; input `<name>` is float32 [batch].
        task: "regression" (loss mse|mae|huber), "binary" (sigmoid output) or "multiclass"
            (softmax over `num_classes`).
        num_classes: classes of a multiclass task.
        hidden_units: the DNN head's layer sizes.
        learning_rate: Adam's learning rate.
        loss: the regression loss.

    Returns:
        A compiled `keras.Model`: the tables' vectors and the numeric features concatenated,
        then the head; output `prediction` is [batch, 1] (regression, binary) or
        [batch, num_classes].
    """
    if not tables and not numeric:
        raise ValueError("the model needs at least one table or numeric input")
    inputs, parts = {}, []
    for t in tables:
        ids = keras.Input(shape=(), dtype="int64", name=t.name)
        inputs[t.name] = ids
        table = keras.layers.Embedding(t.rows, t.dim, trainable=t.trainable, name=embedding_layer_name(t.name))
        parts.append(table(ids))
    for name in numeric:
        x = keras.Input(shape=(), dtype="float32", name=name)
        inputs[name] = x
        parts.append(keras.layers.Reshape((1,), name=f"{name}_column")(x))
    x = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="features")(parts)
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"hidden_{i}")(x)
    if task == "regression":
        output = keras.layers.Dense(1, name="prediction")(x)
        loss_fn = {"mse": "mean_squared_error", "mae": "mean_absolute_error", "huber": "huber"}[loss or "mse"]
        metrics = [keras.metrics.MeanAbsoluteError(name="mae"), keras.metrics.RootMeanSquaredError(name="rmse")]
    elif task == "binary":
        output = keras.layers.Dense(1, activation="sigmoid", name="prediction")(x)
        loss_fn = "binary_crossentropy"
        metrics = [keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")]
    else:
        output = keras.layers.Dense(num_classes, activation="softmax", name="prediction")(x)
        loss_fn = "sparse_categorical_crossentropy"
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    model = keras.Model(inputs=inputs, outputs=output, name="embedpipe")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss_fn, metrics=metrics)
    return model


def set_table_rows(model: keras.Model, table: str, rows: np.ndarray, vectors: np.ndarray) -> None:
    """Overwrites rows `rows` of table `table` with `vectors` ([len(rows), dim]); see `set_rows`."""
    set_rows(model.get_layer(embedding_layer_name(table)), rows, vectors)


def set_rows(layer: keras.layers.Embedding, rows: np.ndarray, vectors: np.ndarray) -> None:
    """Overwrites rows `rows` of an embedding layer with `vectors` ([len(rows), dim]); other rows
    keep their values. Works on frozen tables too (it assigns the weights, no optimizer involved)."""
    if not layer.built:
        layer.build((None,))
    matrix = np.array(layer.embeddings.numpy())
    rows = np.asarray(rows, dtype=np.int64)
    if vectors.shape != (len(rows), matrix.shape[1]):
        raise ValueError(
            f"table {layer.name}: {len(rows)} rows of dim {matrix.shape[1]} expected, got vectors {vectors.shape}"
        )
    matrix[rows] = vectors
    layer.embeddings.assign(matrix)


def headline_metric(task: str) -> str:
    """The eval metric reported at the end of a run."""
    return {"regression": "mae", "binary": "auc", "multiclass": "accuracy"}[task]

"""Exported tables as Keras 3 layers: raw key in, vector out, for any downstream Keras model.

    import keras
    from trainer.layers import embedding_layer

    dow_x_hour = embedding_layer("embedpipe_output/flights/LATEST/export/dow_x_hour")   # frozen
    keys = keras.Input(shape=(), dtype="string")
    x = dow_x_hour(keys)                                   # [batch, dim]
    model = keras.Model(keys, keras.layers.Dense(1)(x))
    model.save("m.keras"); keras.models.load_model("m.keras")   # no custom objects needed

The layer is a `keras.Sequential` of built-in layers only — a lookup (`StringLookup`,
`IntegerLookup` or `Hashing`) and an `Embedding` holding the table's vectors — so it saves and
loads with plain `keras.models.load_model` (safe mode on, nothing to register). Keys map to rows
as described in `trainer.formats` (the same rule as training): unknown keys of a vocabulary
table go to its OOV rows by the same Fingerprint64 hash tf.Transform used, identity tables take
integer keys, hashed tables hash the key (a cross's key is its columns joined by the separator,
e.g. `"Tue x 8"`; the layer of a hashed table takes one key per example, shape [batch]).
`trainable=False` (default) freezes the vectors; `trainable=True` fine-tunes
them. The Embedding's rows are the table's rows reordered to the lookup's indices (OOV indices
first); a table without OOV rows gets one extra all-zero row for unknown keys.
"""

from __future__ import annotations

import keras
import numpy as np

from trainer.tables import EmbeddingTable, bad_vocabulary_key, load_table


def embedding_layer(
    table: str | EmbeddingTable, *, trainable: bool = False, key_dtype: str | None = None, name: str | None = None
) -> keras.Sequential:
    """A Keras layer (a Sequential of built-ins) mapping raw keys of `table` to its vectors.

    table: an exported table directory (loaded and verified) or an `EmbeddingTable`.
    key_dtype: "string" or "int64"; default "int64" for identity tables, "string" otherwise
      (an int64 key of a vocabulary table must be in the vocabulary as its decimal string).
    """
    if isinstance(table, str):
        table = load_table(table)
    kind, oov, real = table.manifest["kind"], table.oov_rows, table.real_rows
    key_dtype = key_dtype or ("int64" if kind == "identity" else "string")
    if key_dtype not in ("string", "int64"):
        raise ValueError(f"key_dtype must be 'string' or 'int64', got {key_dtype!r}")
    name = name or table.name
    vectors = table.vectors
    if kind == "hash":
        lookup = keras.layers.Hashing(num_bins=len(table), name=f"{name}_hash")
        weights = vectors
    else:
        if kind == "identity":
            vocabulary = np.arange(real, dtype=np.int64)
            if key_dtype == "string":
                vocabulary = [str(i) for i in vocabulary]
        else:
            vocabulary = table.keys[:real]
            bad = bad_vocabulary_key(vocabulary)
            if bad is not None:
                raise ValueError(f"table {table.name}: key {bad!r} cannot be held by a Keras lookup layer")
            if key_dtype == "int64":
                try:
                    vocabulary = np.array([int(k) for k in vocabulary], dtype=np.int64)
                except ValueError:
                    raise ValueError(
                        f"table {table.name}: key_dtype='int64' but its keys are not all integers"
                    ) from None
        buckets = max(oov, 1)
        options = dict(vocabulary=vocabulary, num_oov_indices=buckets, name=f"{name}_lookup")
        if key_dtype == "string":
            lookup = keras.layers.StringLookup(**options)
        else:
            # farmhash: an int is hashed as its decimal string, as tf.Transform / tf.lookup do
            lookup = keras.layers.IntegerLookup(**options, oov_method="farmhash" if buckets > 1 else "floormod")
        oov_vectors = vectors[real:] if oov else np.zeros((1, table.dim), vectors.dtype)
        weights = np.concatenate([oov_vectors, vectors[:real]])
    embedding = keras.layers.Embedding(len(weights), table.dim, trainable=trainable, name=f"{name}_embedding")
    embedding.build((None,))
    embedding.set_weights([weights])
    # Lookup layers take keys of any shape; an unbuilt Sequential builds on its first call. A
    # Hashing layer would make it cast the keys to int64, so a hashed table declares its input:
    # one key per example.
    head = [keras.Input(shape=(), dtype=key_dtype, name=f"{name}_key")] if kind == "hash" else []
    return keras.Sequential([*head, lookup, embedding], name=name)

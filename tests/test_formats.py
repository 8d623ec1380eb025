"""Every downstream format of an exported table returns exactly our vectors, key by key.

Feature-column checkpoint + vocabulary file, Keras layer (through save/load), SavedModel
signatures, word2vec text through gensim, and Parquet through pyarrow, pandas and DuckDB; with
awkward keys, and OOV keys landing on the same row tf.Transform would pick.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from schemas.tables import TableSpec
from trainer.export import write_table
from trainer.neighbors import NeighborIndex
from trainer.tables import load_table, unescape_key

# No CR/LF here: tf.Transform never puts them in a vocabulary (test_tables covers them in keys.tsv).
VOCAB = ["plain", "with space", "tab\there", "back\\slash\\s", "naïve ☕", "<b>&\"quote'", "Tue x 8", "x" * 300]
OOV = 3
UNSEEN = ["never seen", "", "Mon x 25", "☕☕"]


def _write(root, name, kind, keys, vocabulary_size=None, oov_rows=0, dim=4, seed=0):
    vectors = np.random.default_rng(seed).normal(size=(len(keys), dim)).astype(np.float32)
    spec = TableSpec(name, kind, ("c",), len(keys), dim, vocabulary_size, oov_rows)
    frequency = np.arange(len(keys), 0, -1, dtype=np.int64)
    return write_table(str(root / name), spec, keys, vectors, frequency, {"output_dir": "run"}), vectors


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    vocab = _write(root, "vocab", "vocabulary", VOCAB + [f"<OOV {i}>" for i in range(OOV)], len(VOCAB), OOV)
    identity = _write(root, "hour", "identity", [str(i) for i in range(24)] + ["<OOV>"], None, 1, seed=1)
    hashed = _write(root, "cross", "hash", [f"<hash {i}>" for i in range(16)], seed=2)
    return {"vocab": vocab, "identity": identity, "hash": hashed}


def _tft_rows(vocabulary_file: str, keys: list[str]) -> np.ndarray:
    """The rows tf.Transform's own apply_vocabulary gives `keys` (OOV keys: its hash buckets)."""
    import tensorflow_transform as tft

    @tf.function
    def rows(x):
        return tft.apply_vocabulary(x, tf.constant(vocabulary_file), num_oov_buckets=OOV)

    return rows(tf.constant(keys)).numpy()


def test_feature_column_recipe_reproduces_every_vector(tables):
    import tf_keras

    path, vectors = tables["vocab"]
    manifest = load_table(path).manifest
    vocab_file = os.path.join(path, manifest["vocabulary_file"]["path"])
    assert open(vocab_file, encoding="utf-8").read().splitlines() == VOCAB
    column = tf.feature_column.embedding_column(
        tf.feature_column.categorical_column_with_vocabulary_file(
            "key", vocab_file, vocabulary_size=len(VOCAB), num_oov_buckets=OOV
        ),
        manifest["dim"],
        ckpt_to_load_from=os.path.join(path, manifest["checkpoint"]["prefix"]),
        tensor_name_in_ckpt=manifest["checkpoint"]["tensor_name"],
        trainable=False,
    )
    layer = tf_keras.layers.DenseFeatures([column])
    got = layer({"key": tf.constant([[k] for k in VOCAB + UNSEEN])}).numpy()
    np.testing.assert_array_equal(got[: len(VOCAB)], vectors[: len(VOCAB)])  # bitwise
    # unseen keys: the OOV row tf.Transform's own lookup picks (Fingerprint64 % OOV buckets)
    oov_rows = _tft_rows(vocab_file, UNSEEN)
    # Feature columns treat "" as a missing value (all-zero vector); tf.Transform gives it an OOV row.
    empty = UNSEEN.index("")
    np.testing.assert_array_equal(got[len(VOCAB) + empty], 0.0)
    got[len(VOCAB) + empty] = vectors[oov_rows[empty]]
    np.testing.assert_array_equal(got[len(VOCAB) :], vectors[oov_rows])
    assert set(oov_rows) <= set(range(len(VOCAB), len(VOCAB) + OOV)) and len(set(oov_rows)) > 1


def test_feature_columns_for_identity_and_hashed_tables(tables):
    import tf_keras

    path, vectors = tables["identity"]
    m = load_table(path).manifest
    identity = tf.feature_column.embedding_column(
        tf.feature_column.categorical_column_with_identity("hour", num_buckets=m["rows"], default_value=m["rows"] - 1),
        m["dim"],
        ckpt_to_load_from=os.path.join(path, m["checkpoint"]["prefix"]),
        tensor_name_in_ckpt=m["checkpoint"]["tensor_name"],
        trainable=False,
    )
    hours = [0, 5, 23, 24, 99, -3]
    got = tf_keras.layers.DenseFeatures([identity])({"hour": tf.constant([[h] for h in hours], tf.int64)}).numpy()
    np.testing.assert_array_equal(got, vectors[[0, 5, 23, 24, 24, 24]])  # out of range -> the OOV row

    path, vectors = tables["hash"]
    m = load_table(path).manifest
    hashed = tf.feature_column.embedding_column(
        tf.feature_column.categorical_column_with_hash_bucket("cross", hash_bucket_size=m["rows"]),
        m["dim"],
        ckpt_to_load_from=os.path.join(path, m["checkpoint"]["prefix"]),
        tensor_name_in_ckpt=m["checkpoint"]["tensor_name"],
        trainable=False,
    )
    keys = VOCAB + [k for k in UNSEEN if k]  # "" is a missing value to feature columns
    got = tf_keras.layers.DenseFeatures([hashed])({"cross": tf.constant([[k] for k in keys])}).numpy()
    np.testing.assert_array_equal(got, vectors[tf.strings.to_hash_bucket_fast(keys, m["rows"]).numpy()])


def test_keras_layer_survives_save_and_load(tables, tmp_path):
    import keras

    from trainer.layers import embedding_layer

    path, vectors = tables["vocab"]
    layer = embedding_layer(path)
    keys = keras.Input(shape=(), dtype="string")
    model = keras.Model(keys, keras.layers.Dense(2)(layer(keys)))
    assert not layer.trainable_weights and len(model.trainable_weights) == 2
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")  # safe mode, no custom objects
    inner = loaded.get_layer("vocab")
    got = inner(tf.constant(VOCAB + UNSEEN)).numpy()
    np.testing.assert_array_equal(got[: len(VOCAB)], vectors[: len(VOCAB)])
    np.testing.assert_array_equal(got[len(VOCAB) :], vectors[_tft_rows(os.path.join(path, "vocabulary.txt"), UNSEEN)])
    np.testing.assert_array_equal(
        loaded.predict(tf.constant(VOCAB), verbose=0), model.predict(tf.constant(VOCAB), verbose=0)
    )
    assert embedding_layer(path, trainable=True).trainable_weights

    path, vectors = tables["identity"]
    got = embedding_layer(path)(tf.constant([0, 7, 23, 24, -1], tf.int64)).numpy()
    np.testing.assert_array_equal(got, vectors[[0, 7, 23, 24, 24]])
    path, vectors = tables["hash"]
    got = embedding_layer(path)(tf.constant(VOCAB)).numpy()
    np.testing.assert_array_equal(got, vectors[tf.strings.to_hash_bucket_fast(VOCAB, 16).numpy()])


def test_saved_model_lookup_and_neighbors(tables):
    path, vectors = tables["vocab"]
    loaded = tf.saved_model.load(os.path.join(path, "saved_model"))
    got = loaded.signatures["lookup"](keys=tf.constant(VOCAB + ["<OOV 1>"]))["vectors"].numpy()
    np.testing.assert_array_equal(got[: len(VOCAB)], vectors[: len(VOCAB)])
    result = loaded.signatures["neighbors"](keys=tf.constant(VOCAB[:3]), k=tf.constant(4))
    index = NeighborIndex(load_table(path))
    for i, key in enumerate(VOCAB[:3]):
        expected = index.neighbors(key, 4)
        assert [k.decode() for k in result["keys"].numpy()[i]] == [k for k, _, _ in expected]
        np.testing.assert_allclose(result["scores"].numpy()[i], [s for _, _, s in expected], rtol=1e-5)

    path, vectors = tables["identity"]
    loaded = tf.saved_model.load(os.path.join(path, "saved_model"))
    got = loaded.signatures["lookup"](keys=tf.constant(["3", "24", "x"]))["vectors"].numpy()
    np.testing.assert_array_equal(got, vectors[[3, 24, 24]])


def test_word2vec_file_loads_in_gensim_and_agrees_with_neighbors(tables):
    import gensim

    path, vectors = tables["vocab"]
    kv = gensim.models.KeyedVectors.load_word2vec_format(os.path.join(path, "vectors.w2v.txt"), binary=False)
    keys = [unescape_key(k) for k in kv.index_to_key]
    assert keys == VOCAB  # the real rows; OOV rows are left out
    np.testing.assert_array_equal(kv.vectors, vectors[: len(VOCAB)])  # text, yet bitwise
    index = NeighborIndex(load_table(path))
    for key in VOCAB:
        ours = index.neighbors(key, 3)
        theirs = kv.most_similar(kv.index_to_key[VOCAB.index(key)], topn=3)
        assert [unescape_key(k) for k, _ in theirs] == [k for k, _, _ in ours]
        np.testing.assert_allclose([s for _, s in theirs], [s for _, _, s in ours], rtol=1e-5)


def test_parquet_reads_the_same_in_pyarrow_pandas_and_duckdb(tables):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, vectors = tables["vocab"]
    file = os.path.join(path, "table.parquet")
    schema = pq.read_schema(file)
    assert schema.field("key").type == pa.string() and schema.field("vector").type == pa.list_(pa.float32())
    assert schema.field("frequency").type == pa.int64() and schema.field("row").type == pa.int64()
    frame = pq.read_table(file).to_pandas()
    assert list(frame["key"]) == load_table(path).keys
    np.testing.assert_array_equal(np.stack(frame["vector"].to_numpy()), vectors)
    import duckdb

    rows = duckdb.sql(f"SELECT key, vector, frequency FROM read_parquet('{file}') ORDER BY row").fetchall()
    assert [r[0] for r in rows] == load_table(path).keys
    np.testing.assert_array_equal(np.array([r[1] for r in rows], np.float32), vectors)
    duck_type = duckdb.sql(f"SELECT typeof(vector) FROM read_parquet('{file}') LIMIT 1").fetchall()[0][0]
    assert duck_type == "FLOAT[]"


def test_saved_model_of_a_table_without_oov_rows(tmp_path):
    path, vectors = _write(tmp_path, "closed", "vocabulary", ["a", "b", "c"], 3, 0)
    loaded = tf.saved_model.load(os.path.join(path, "saved_model"))
    got = loaded.signatures["lookup"](keys=tf.constant(["b", "unknown"]))["vectors"].numpy()
    np.testing.assert_array_equal(got, [vectors[1], np.zeros(4, np.float32)])
    result = loaded.signatures["neighbors"](keys=tf.constant(["a", "unknown"]), k=tf.constant(2))
    assert [k.decode() for k in result["keys"].numpy()[0]] == [
        k for k, _, _ in NeighborIndex(load_table(path)).neighbors("a", 2)
    ]
    assert np.isneginf(result["scores"].numpy()[1]).all()  # an unknown key has no neighbours

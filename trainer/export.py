"""Export: every learned embedding table as a self-describing directory downstream code can load.

    embedpipe export --config taxi --output /tmp/taxi    # after `embedpipe train`

Each table's directory (`schemas.layout.table_dir`: `<run>/export/<table>/`) holds:

* `keys.tsv` — one key per line, in row order (OOV, hash and bucket rows keyed `<OOV 0>`,
  `<hash 17>`, ...; see `schemas.tables`). Backslash, tab, CR and LF inside a key are written
  as `\\\\`, `\\t`, `\\r`, `\\n`;
* `vectors.npy` — float32 `[rows, dim]` (NumPy format, no pickle);
* `table.parquet` — columns `key` (string), `row` (int64), `frequency` (int64: occurrences in
  the training split), `vector` (list<float32>), and `label` (string) where the config gives
  labels (item titles);
* `projector_config.pbtxt`, `vectors.tsv`, `metadata.tsv`, `events.out.tfevents.0.embedpipe` —
  the TensorBoard Embedding Projector (`tensorboard --logdir <output>/export` shows every table;
  the one-event file makes the directory a TensorBoard run); a table of more than
  100,000 rows shows its 100,000 most frequent rows there (`projector_rows` in the manifest);
* for other downstream code (see `trainer.formats`): `embedding.ckpt.*` (a TensorFlow checkpoint
  for `tf.feature_column.embedding_column(ckpt_to_load_from=...)`), `vocabulary.txt` (vocabulary
  tables), `vectors.w2v.txt` (word2vec text, for gensim) and `saved_model/` (signatures `lookup`
  and `neighbors`); `trainer.layers.embedding_layer` builds a Keras layer from the directory;
* `manifest.json` — table name, kind, columns, rows, dim, the source run, how to load the
  checkpoint (`checkpoint.prefix`, `checkpoint.tensor_name`), and a sha256 per file.

A collaborative export also has `user` (every model's user vectors, from the full histories)
and `recommender/` (histories, a SavedModel with `query` and `recommend` from raw item keys):
see `trainer.recommender`.

`trainer.tables.load_table` reads a table back and checks it against its manifest.
"""

from __future__ import annotations

import json
import logging
import os
import time

import keras
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import tensorflow as tf
import tensorflow_transform as tft
from tensorflow.core.util import event_pb2

from schemas import layout
from schemas.config import CollaborativeConfig, Config
from schemas.errors import InputError
from schemas.manifest import read_manifest, update_manifest
from schemas.tables import TableSpec, table_keys, table_specs
from trainer import formats, recommender, retrieval, sequences
from trainer.model import embedding_layer_name
from trainer.streams import output_stream
from trainer.tables import FILES, escape_key, sha256_file

_LOG = logging.getLogger(__name__)
PROJECTOR_MAX_ROWS = 100_000  # what the Embedding Projector handles comfortably


def export(config: Config | CollaborativeConfig, output_dir: str) -> dict:
    """Writes every table of the run's trained model (of a collaborative run: the best model's,
    with its user vectors and recommender).

    Args:
        config: the run's config.
        output_dir: the run directory (trained).

    Returns:
        The `export` manifest section: {"dir", "tables": {name: table directory}, "timings_s"}.

    Raises:
        FileNotFoundError: the run has no trained model.
        InputError: the item metadata file is missing or lacks its columns.
    """
    started = time.time()
    tft_output = tft.TFTransformOutput(layout.transform_dir(output_dir))
    run = read_manifest(output_dir)
    specs = {spec.name: spec for spec in table_specs(config, tft_output)}
    frequencies = _frequencies(layout.read_id_counts(output_dir), specs)
    keys = {name: table_keys(spec, tft_output) for name, spec in specs.items()}  # read once: 500k items
    trained, model_path, model = _trained_tables(config, output_dir, run, specs, keys)
    source = {
        "output_dir": os.path.abspath(output_dir) if "://" not in output_dir else output_dir,
        "config": run.get("preprocess", {}).get("config", {}),
        "model": model_path,
    }
    labels = _item_labels(config, keys[config.item.name]) if isinstance(config, CollaborativeConfig) else None
    _release_arrow()
    tables = {}
    for spec in specs.values():
        vectors = np.asarray(trained[spec.name], np.float32)
        if vectors.shape != (spec.rows, spec.dim) or len(keys[spec.name]) != spec.rows:
            raise RuntimeError(
                f"table {spec.name}: model has {vectors.shape}, transform says {spec.rows}x{spec.dim}, "
                f"{len(keys[spec.name])} keys; was the model trained on this preprocess output?"
            )
        path = layout.table_dir(output_dir, spec.name)
        table_labels = labels if isinstance(config, CollaborativeConfig) and spec.name == config.item.name else None
        tables[spec.name] = write_table(
            path, spec, keys[spec.name], vectors, frequencies[spec.name], source, table_labels
        )
        _release_arrow()
        _LOG.info("export: %s %dx%d -> %s", spec.name, spec.rows, spec.dim, path)
    extra = {}
    if isinstance(config, CollaborativeConfig):
        item = specs[config.item.name]
        extra["recommender"] = recommender.write_recommender(
            layout.export_dir(output_dir), model, run["train"]["best_model"], item, keys[item.name], config.max_history
        )
        _LOG.info("export: recommender (%s) -> %s", extra["recommender"]["model"], layout.export_dir(output_dir))
    elapsed = time.time() - started
    section = {
        "dir": layout.export_dir(output_dir),
        "tables": tables,
        **extra,
        "timings_s": {"export": round(elapsed, 2)},
    }
    update_manifest(output_dir, "export", section)
    return section


def _frequencies(id_counts: dict, specs: dict[str, TableSpec]) -> dict[str, np.ndarray]:
    """{table: int64 [rows]}: each row's occurrences in the training split (`id_counts.json`,
    0 where it has none), so that the JSON's dicts (~0.1 KB a row) are not kept."""
    frequencies = {}
    for name, spec in specs.items():
        counts = id_counts.get(name, {})
        frequencies[name] = np.array([counts.get(str(i), 0) for i in range(spec.rows)], dtype=np.int64)
    return frequencies


def _release_arrow() -> None:
    """Hands back the pages Arrow's allocator keeps for reuse after a large piece of work (it
    held ~0.1 GiB after the item titles of a 500,000-movie catalogue, and after each table's
    Parquet file), so that they do not add up across the export's steps."""
    pa.default_memory_pool().release_unused()


def _trained_tables(config, output_dir: str, run: dict, specs: dict, keys: dict) -> tuple[dict, str, object]:
    """({table name: matrix}, model path, model) of the trained model (the best one of a
    collaborative run, whose user table is computed here: `trainer.recommender.user_vectors`)."""
    if isinstance(config, CollaborativeConfig):
        best = run.get("train", {}).get("best_model")
        if best is None:
            raise FileNotFoundError(f"{output_dir}: no trained collaborative model; run `embedpipe train` first")
        path = layout.retrieval_tables_path(output_dir, best)
        users, items = specs[config.user.name], specs[config.item.name]
        model = retrieval.load_model(path, best, users, items, config.max_history)
        histories = sequences.user_histories(
            layout.examples_pattern(output_dir, layout.TRAIN), layout.examples_pattern(output_dir, layout.EVAL),
            users=users.rows,
        )  # fmt: skip
        vectors = recommender.user_vectors(
            model, histories, users, keys[users.name], keys[items.name], config.max_history,
            layout.histories_path(layout.export_dir(output_dir)),
        )  # fmt: skip
        return {config.user.name: vectors, config.item.name: model.tables()["item"]}, path, model
    path = layout.keras_model_path(layout.model_dir(output_dir))
    model = keras.models.load_model(path)
    return {name: model.get_layer(embedding_layer_name(name)).get_weights()[0] for name in config.tables}, path, model


def _item_labels(config: CollaborativeConfig, keys: list[str]) -> list[str] | None:
    """The label of each item key in row order from the item metadata file ("" for a key the
    file lacks, or whose label is null; of a key listed twice, the last row's); None without one.

    Matched in Arrow (hash join), not through a Python dict of the whole catalogue (500,000
    titles would be ~0.1 GiB of Python strings).
    """
    md = config.metadata
    if md is None:
        return None
    if not tf.io.gfile.exists(md.path):
        raise InputError(f"item_metadata.path: {md.path} does not exist (config {config.source}; see --item-metadata)")
    with tf.io.gfile.GFile(md.path, "rb") as f:
        data = pa.BufferReader(f.read())
    table = pq.read_table(data) if md.format == "parquet" else pacsv.read_csv(data)
    for column in (md.key, md.label):
        if column not in table.column_names:
            raise InputError(f"{md.path}: column {column!r} (item_metadata of {config.source}) is not in the file")
    if not table.num_rows:
        return None
    last_first = pa.array(np.arange(table.num_rows - 1, -1, -1))  # index_in finds the first: the last row
    known = pc.take(pc.cast(table.column(md.key), pa.string()), last_first)
    label = pc.take(pc.cast(table.column(md.label), pa.string()), last_first)
    rows = pc.index_in(pa.array(keys, pa.string()), value_set=known.combine_chunks())
    return pc.fill_null(pc.take(label, rows), "").to_pylist()


def write_table(
    path: str,
    spec: TableSpec,
    keys: list[str],
    vectors: np.ndarray,
    frequency: np.ndarray,
    source: dict,
    labels: list[str] | None = None,
) -> str:
    """Writes one table directory (files listed in the module docstring); returns its path.

    `labels` (one per row, e.g. item titles) add a `label` column to the projector metadata.
    """
    if vectors.size >= 2**31:  # list<float32> has int32 offsets; checked before anything is written
        raise ValueError(f"table {spec.name}: {vectors.shape} is too large for one Parquet list<float32> column")
    tf.io.gfile.makedirs(path)
    escaped = [escape_key(k) for k in keys]
    _write_text(os.path.join(path, FILES["keys"]), "".join(k + "\n" for k in escaped))
    with tf.io.gfile.GFile(os.path.join(path, FILES["vectors"]), "wb") as f:
        np.save(f, vectors, allow_pickle=False)
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "row": pa.array(np.arange(len(keys), dtype=np.int64)),
            "frequency": pa.array(frequency),
            "vector": pa.ListArray.from_arrays(
                pa.array(np.arange(0, vectors.size + 1, vectors.shape[1], dtype=np.int32)), pa.array(vectors.ravel())
            ),
            **({"label": pa.array(labels, pa.string())} if labels else {}),
        }
    )
    with output_stream(os.path.join(path, FILES["parquet"])) as f:
        pq.write_table(table, f)
    # The projector shows at most PROJECTOR_MAX_ROWS points: the most frequent rows, in row order.
    shown = np.arange(len(keys))
    if len(keys) > PROJECTOR_MAX_ROWS:
        shown = np.sort(np.argsort(-frequency, kind="stable")[:PROJECTOR_MAX_ROWS])
    with tf.io.gfile.GFile(os.path.join(path, FILES["projector_tensor"]), "w") as f:
        for _, rows in formats.iter_formatted_rows(vectors[shown], "\t"):
            f.write("".join(row + "\n" for row in rows))
    columns = [escaped, [str(n) for n in frequency]] + ([[escape_key(x) for x in labels]] if labels else [])
    columns = [[column[i] for i in shown] for column in columns]
    header = "key\tfrequency" + ("\tlabel" if labels else "")
    _write_text(
        os.path.join(path, FILES["projector_metadata"]),
        header + "\n" + "".join("\t".join(row) + "\n" for row in zip(*columns)),
    )
    _write_text(
        os.path.join(path, FILES["projector_config"]),
        "embeddings {\n"
        f'  tensor_name: "{spec.name}"\n'
        f'  tensor_path: "{FILES["projector_tensor"]}"\n'
        f'  metadata_path: "{FILES["projector_metadata"]}"\n'
        "}\n",
    )
    # wall_time 0: the file is the same bytes on every export
    with tf.io.TFRecordWriter(os.path.join(path, FILES["projector_run"])) as writer:
        writer.write(event_pb2.Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString())
    extra, described = _write_formats(path, spec, keys, vectors)
    files = {**FILES, **extra}
    manifest = {
        "name": spec.name,
        "kind": spec.kind,
        "columns": list(spec.columns),
        "rows": spec.rows,
        "dim": spec.dim,
        "vocabulary_size": spec.vocabulary_size,
        "oov_rows": spec.oov_rows,
        "separator": spec.separator,
        "projector_rows": int(len(shown)),
        "source": source,
        **described,
        "files": {name: {"path": fn, "sha256": sha256_file(os.path.join(path, fn))} for name, fn in files.items()},
    }
    _write_text(os.path.join(path, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _write_formats(path: str, spec: TableSpec, keys: list[str], vectors: np.ndarray) -> tuple[dict[str, str], dict]:
    """The `trainer.formats` files; ({file key: relative path}, manifest entries describing them)."""
    real_rows = spec.rows - spec.oov_rows
    files = formats.write_checkpoint(path, spec.name, vectors)
    if spec.kind == "vocabulary":
        files["vocabulary"] = formats.write_vocabulary(path, spec.name, keys, spec.vocabulary_size)
    files["word2vec"] = formats.write_word2vec(path, keys, vectors, real_rows)
    files.update(formats.write_saved_model(path, spec.kind, keys, vectors, spec.vocabulary_size, spec.oov_rows))
    described = {
        "checkpoint": {"prefix": formats.CHECKPOINT, "tensor_name": spec.name, "shape": [spec.rows, spec.dim]},
        "word2vec": {"path": formats.WORD2VEC, "rows": real_rows},
        "saved_model": {"path": formats.SAVED_MODEL, "signatures": ["lookup", "neighbors"]},
    }
    if spec.kind == "vocabulary":
        described["vocabulary_file"] = {
            "path": formats.VOCABULARY,
            "size": spec.vocabulary_size,
            "num_oov_buckets": spec.oov_rows,
        }
    return files, described


def _write_text(path: str, text: str) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)

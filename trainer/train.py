"""Training: learn the embedding tables inside a supervised model on the transformed data.

    embedpipe train --config taxi --output /tmp/taxi     # after `embedpipe preprocess`

Training fits on the training split less a fixed validation slice of it
(`training.validation_percent`, by a fingerprint of each example), which chooses the epoch
(early stopping, best weights restored); the eval split is never looked at until the final
metrics, so they are honest. Reads the run's preprocess outputs, writes its model directory (`schemas.layout.model_dir`):
`model.keras` (the Keras model),
`serving/` (a SavedModel whose `serving_default` takes *raw* feature columns, applies the
tf.Transform graph and returns `prediction`), `logs/` (TensorBoard), `history.json`; and the
`train` section of the run manifest with the eval metrics.

`baseline=True` (`embedpipe train --baseline`) trains the same model without any embedding table (numeric features only): the
yardstick the embeddings have to beat.

Transfer learning: a categorical feature or cross with `init_from: {path: <export>/<table>,
trainable: false|true}` starts from a previously exported table (`trainer.tables.load_table`,
checksums verified). Rows are matched by key (`match_rows`): a key of the new table that the
source has gets the source's vector, new keys keep their random initialisation, and OOV row i
copies the source's OOV row i when both tables have OOV rows. `trainable: false` freezes the
table; `true` fine-tunes it. The match rate (of rows, and of training occurrences from
`id_counts.json`) is logged and written to the manifest as `train.transfer.<table>`. A missing
source table, or one whose dim differs from the table's, stops training with a `ConfigError`
naming the field.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft

from schemas import layout
from schemas.config import CategoricalFeature, CollaborativeConfig, Config
from schemas.errors import ConfigError
from schemas.features import LABEL_KEY, LABEL_VOCABULARY, raw_feature_spec
from schemas.manifest import read_manifest, update_manifest
from schemas.tables import TableSpec, table_keys, table_specs
from trainer import retrieval
from trainer.data import make_dataset
from trainer.model import Table, build_model, headline_metric, set_table_rows
from trainer.tables import EmbeddingTable, RowMatch, load_source, match_rows

_LOG = logging.getLogger(__name__)


class ServingModule(tf.Module):
    """Raw features in, predictions out: the tf.Transform layer followed by the Keras model."""

    def __init__(self, model: keras.Model, tft_output: tft.TFTransformOutput, raw_spec: dict):
        super().__init__()
        self.model = model
        self.tft_layer = tft_output.transform_features_layer()
        self.input_names = list(model.input)  # build_model's inputs are a dict by feature name
        signature = {name: tf.TensorSpec([None], spec.dtype, name=name) for name, spec in raw_spec.items()}
        self.serve = tf.function(self._serve, input_signature=[signature])

    def _serve(self, raw: dict) -> dict:
        transformed = self.tft_layer(raw)
        prediction = self.model({k: transformed[k] for k in self.input_names}, training=False)
        return {"prediction": prediction}


@dataclass(frozen=True)
class Transfer:
    """A table that starts from an exported one (`init_from` of its feature)."""

    feature: CategoricalFeature
    spec: TableSpec
    source: EmbeddingTable
    match: RowMatch

    def report(self, counts: dict[str, int] | None) -> dict:
        """The manifest entry; `counts` are the table's training occurrences per row id."""
        rows = len(self.match.rows)
        entry = {
            "source": self.source.path,  # under the run LATEST named, if it was used
            "source_configured": self.feature.init_from.path,
            "trainable": self.feature.init_from.trainable,
            "rows": self.spec.rows,
            "matched_rows": rows,
            "matched_keys": self.match.matched_keys,
            "oov_rows_copied": self.match.oov_rows,
            "match_rate": round(rows / self.spec.rows, 4),
            "occurrence_match_rate": None,
        }
        total = sum(counts.values()) if counts else 0
        if total:
            # rows matched by key only: a copied OOV row says nothing about the keys that land on it
            hits = sum(counts.get(str(r), 0) for r in self.match.rows[: self.match.matched_keys].tolist())
            entry["occurrence_match_rate"] = round(hits / total, 4)
        return entry


def prepare_transfers(config: Config, specs: list[TableSpec], tft_output: tft.TFTransformOutput) -> dict[str, Transfer]:
    """Loads the source table of every `init_from` and matches its keys; raises ConfigError
    naming the field when a source is missing or does not fit the table."""
    by_name = {s.name: s for s in specs}
    transfers = {}
    for f in config.categorical:
        if f.init_from is None:
            continue
        where, path, spec = f"{config.source}: {f.config_field}", f.init_from.path, by_name[f.name]
        source = load_source(path, spec.dim, where)
        source_kind = source.manifest.get("kind")
        if (spec.kind == "hash" or source_kind == "hash") and (spec.kind, spec.rows) != (source_kind, len(source)):
            raise ConfigError(
                f"{where}.init_from.path: a hash table starts only from a hash table with as many buckets; "
                f"this one is {spec.kind} with {spec.rows} rows, {path} is {source_kind} with {len(source)} rows"
            )
        match = match_rows(table_keys(spec, tft_output), spec.oov_rows, source.keys, source.oov_rows)
        transfers[f.name] = Transfer(f, spec, source, match)
    return transfers


def train(config: Config, output_dir: str, *, baseline: bool = False, epochs: int | None = None) -> dict:
    """Trains the supervised model of a preprocessed run; saves it and its serving SavedModel.

    Args:
        config: the run's supervised config.
        output_dir: the run directory (preprocessed).
        baseline: train the numeric-only yardstick instead (no tables), into `baseline/`.
        epochs: maximum epochs (default `training.epochs`; early stopping on the loss of the
            validation slice, `training.validation_percent` of the training split).

    Returns:
        The `train` (or `baseline`) manifest section: eval metrics, epochs run, tables, timings.

    Raises:
        ConfigError: an `init_from` source table is missing or does not fit its table.
    """
    started = time.time()
    t = config.training
    keras.utils.set_random_seed(t.seed)
    tft_output = tft.TFTransformOutput(layout.transform_dir(output_dir))
    specs = [] if baseline else table_specs(config, tft_output)
    numeric = [n.name for n in config.numeric]
    task = config.label.task
    # multiclass: the classes seen in training plus the one OOV class (see pipeline.preprocessing)
    num_classes = tft_output.vocabulary_size_by_name(LABEL_VOCABULARY) + 1 if task == "multiclass" else 2
    transfers = {} if baseline else prepare_transfers(config, specs, tft_output)
    frozen = {name for name, tr in transfers.items() if not tr.feature.init_from.trainable}
    model = build_model(
        [Table(s.name, s.rows, s.dim, trainable=s.name not in frozen) for s in specs],
        numeric,
        task,
        num_classes=num_classes,
        hidden_units=t.hidden_units,
        learning_rate=t.learning_rate,
        loss=config.label.loss,
    )
    transfer_section = _apply_transfers(model, transfers, output_dir)
    used = [s.name for s in specs] + numeric + [LABEL_KEY]
    spec = {k: v for k, v in tft_output.transformed_feature_spec().items() if k in used}
    rows = read_manifest(output_dir).get("preprocess", {}).get("rows", {})
    # (split, part): the training split less its validation slice fits, the slice chooses the
    # epoch, and the eval split is only reported on.
    parts = {"fit": ("train", False), "validation": ("train", True), "eval": ("eval", None)}
    datasets = {
        part: make_dataset(
            layout.examples_pattern(output_dir, split),
            spec,
            t.batch_size,
            shuffle=part == "fit",
            seed=t.seed,
            label_shape_1=task != "multiclass",
            num_rows=rows.get(split) if validation is None else None,
            shuffle_buffer=t.shuffle_buffer,
            cache_max_bytes=t.cache_max_mb << 20,
            slice_percent=0 if validation is None else t.validation_percent,
            validation=bool(validation),
        )
        for part, (split, validation) in parts.items()
    }
    out = layout.model_dir(output_dir, baseline)
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=t.patience, restore_best_weights=True),
        keras.callbacks.TensorBoard(log_dir=layout.logs_dir(out)),
    ]
    _LOG.info(
        "train: %s model, tables %s, numeric %s, up to %d epochs",
        "baseline" if baseline else "embedding",
        {s.name: f"{s.rows}x{s.dim}" for s in specs},
        numeric,
        epochs or t.epochs,
    )
    with warnings.catch_warnings():
        # The fit part's length is unknown until its first epoch ends (a slice of the split), which
        # Keras reports as "Your input ran out of data" once; it then knows the steps per epoch.
        warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)
        history = model.fit(
            datasets["fit"],
            validation_data=datasets["validation"],
            epochs=epochs or t.epochs,
            callbacks=callbacks,
            shuffle=False,  # the dataset shuffles itself
            verbose=2,
        )
    metrics = {k: float(v) for k, v in model.evaluate(datasets["eval"], verbose=0, return_dict=True).items()}
    model.save(layout.keras_model_path(out))
    raw_spec = raw_feature_spec(config, include_label=False)
    serving = ServingModule(model, tft_output, raw_spec)
    tf.saved_model.save(serving, layout.serving_dir(out), signatures={"serving_default": serving.serve})
    with tf.io.gfile.GFile(layout.history_path(out), "w") as f:
        json.dump({k: [float(x) for x in v] for k, v in history.history.items()}, f, indent=1)
    elapsed = time.time() - started
    headline = headline_metric(task)
    section = {
        "model_dir": out,
        "baseline": baseline,
        "epochs_run": len(history.history["loss"]),
        # the epoch kept: the best validation loss (on `validation_percent` of the training split)
        "best_epoch": int(np.argmin(history.history["val_loss"])) + 1,
        "validation_percent": t.validation_percent,
        "eval_metrics": metrics,
        "headline_metric": {"name": headline, "value": metrics[headline]},
        "tables": {s.name: {"rows": s.rows, "dim": s.dim} for s in specs},
        **({"transfer": transfer_section} if transfer_section else {}),
        "timings_s": {"train": round(elapsed, 2)},
    }
    _LOG.info(
        "train: eval %s = %.4f after %d epochs (%.1fs)", headline, metrics[headline], section["epochs_run"], elapsed
    )
    update_manifest(output_dir, "baseline" if baseline else "train", section)
    return section


def _apply_transfers(model: keras.Model, transfers: dict[str, Transfer], output_dir: str) -> dict:
    """Copies the matched source rows into the model's tables; returns `train.transfer`."""
    counts = layout.read_id_counts(output_dir) if transfers else {}
    section = {}
    for name, tr in transfers.items():
        set_table_rows(model, name, tr.match.rows, tr.source.vectors[tr.match.source_rows])
        section[name] = entry = tr.report(counts.get(name))
        occurrences = entry["occurrence_match_rate"]
        _LOG.log(
            logging.WARNING if entry["matched_keys"] == 0 else logging.INFO,
            "train: %s starts from %s (%s): %d of %d rows matched (%.1f%%; %d by key, %d OOV)%s",
            name,
            entry["source"],
            "fine-tuned" if entry["trainable"] else "frozen",
            entry["matched_rows"],
            entry["rows"],
            100 * entry["match_rate"],
            entry["matched_keys"],
            entry["oov_rows_copied"],
            "" if occurrences is None else f", {100 * occurrences:.1f}% of training occurrences",
        )
    return section


def train_any(config: Config | CollaborativeConfig, output_dir: str, **kwargs) -> dict:
    """`train` for a supervised config, `trainer.retrieval.train` for a collaborative one
    (which has no baseline: it reports popularity instead)."""
    if isinstance(config, CollaborativeConfig):
        kwargs.pop("baseline", None)
        return retrieval.train(config, output_dir, **kwargs)
    return train(config, output_dir, **kwargs)

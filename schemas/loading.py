"""Loading a config: YAML -> a validated `Config` or `CollaborativeConfig` (`schemas.config`).

    from schemas.loading import load_config
    config = load_config("taxi")            # a bundled config by name, or any path

Every check happens here, once, and every error is a `ConfigError` naming the file and the field
(`schemas/taxi.yaml: categorical.company.top_k: expected an integer, got 'ten'`). The allowed
keys of a section and the defaults of absent ones come from the dataclass fields in
`schemas.config`, so a default or a key is written once, there. Relative paths in a config
(`input.path`, `init_from.path`, `item_metadata.path`) are relative to the config file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
from collections.abc import Callable
from importlib import resources
from typing import Any

import tensorflow as tf
import yaml

from schemas.config import (
    CATEGORICAL_TYPES,
    COLUMN_TYPES,
    FEATURE_NAME,
    INPUT_FORMATS,
    LABEL_KEY,
    MAX_BUCKETIZE,
    MAX_TABLE_ROWS,
    REGRESSION_LOSSES,
    RETRIEVAL_MODELS,
    TASKS,
    CategoricalFeature,
    CollaborativeConfig,
    Config,
    DriftLimits,
    InputConfig,
    ItemMetadata,
    LabelConfig,
    NumericFeature,
    RetrievalEvaluation,
    RetrievalTraining,
    SplitConfig,
    TableInit,
    TrainingConfig,
    VocabularySide,
)
from schemas.errors import ConfigError

# The `interactions:` section of a collaborative config holds these CollaborativeConfig fields.
INTERACTION_FIELDS = ("user", "item", "timestamp", "weight", "holdout", "max_history")


def bundled_config_names() -> list[str]:
    """The configs shipped in `schemas/` (`taxi`, `flights`, ...), by name."""
    return sorted(p.name[:-5] for p in resources.files("schemas").iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
    """A path to an existing file, or the name of a bundled config (`taxi`, `flights`).

    Raises:
        ConfigError: neither a file nor a bundled config.
    """
    if "://" in name_or_path:  # gs:// and the like: read through TensorFlow's filesystems
        return name_or_path
    if os.path.isfile(name_or_path):
        return os.path.abspath(name_or_path)
    bundled = resources.files("schemas").joinpath(f"{name_or_path}.yaml")
    if bundled.is_file():
        return str(bundled)
    raise ConfigError(
        f"{name_or_path}: no such config file, and not a bundled config (bundled: {', '.join(bundled_config_names())})"
    )


def load_config(name_or_path: str) -> Config | CollaborativeConfig:
    """Loads and validates a config.

    Args:
        name_or_path: a YAML file (local, or any URL tf.io.gfile reads: gs://), or the name of a
            bundled config.

    Returns:
        A `CollaborativeConfig` for `task: collaborative`, else a (supervised) `Config`.

    Raises:
        ConfigError: naming the file and the field of the first problem found.
    """
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    parser = _Parser(path)
    if isinstance(raw, dict) and raw.get("task") == "collaborative":
        return parser.collaborative(raw)
    return parser.config(raw)


def _read_text(path: str) -> str:
    """The config file's text, from local disk or any filesystem tf.io.gfile reaches (gs://)."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read().decode("utf-8")
    except tf.errors.NotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tf.errors.OpError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.message}") from None


def _beside(config_path: str, path: str) -> str:
    """`path` relative to the folder of the config file at `config_path` (a local path or a URL)."""
    if "://" not in config_path:
        return os.path.normpath(os.path.join(os.path.dirname(config_path), path))
    scheme, _, rest = config_path.partition("://")
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}/" + posixpath.normpath(posixpath.join(posixpath.dirname(key), path)).lstrip("/")


def field_names(cls, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The dataclass's field names (its config keys), in declaration order, but `exclude`."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in exclude)


def with_defaults(section: dict, cls) -> Callable[[str], Any]:
    """`get(key)`: the section's value for `key`, else the default of field `key` of `cls`."""
    return lambda key: section.get(key, default(cls, key))


def default(cls, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (where each default is written)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    if field.default is dataclasses.MISSING:
        raise TypeError(f"{cls.__name__}.{name} has no default")
    return field.default


class _Parser:
    """Walks the YAML tree with the field path at hand, so every error can name it."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, problem: str):
        raise ConfigError(f"{self.path}: {where}: {problem}")

    # -- values --------------------------------------------------------------------------------

    def mapping(self, value, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(where or "top level", f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                self.fail(_join(where, str(key)), f"unknown key (expected one of: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                self.fail(_join(where, key), "required key is missing")
        return value

    def string(self, value, where: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(where, f"expected a non-empty string, got {value!r}")
        if choices and value not in choices:
            self.fail(where, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, value, where: str, minimum: int = 1, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"expected an integer, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            self.fail(where, f"expected an integer {bound}, got {value}")
        return value

    def optional_integer(self, value, where: str, minimum: int = 1, maximum: int | None = None) -> int | None:
        return None if value is None else self.integer(value, where, minimum, maximum)

    def number(self, value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            self.fail(where, f"expected a positive number, got {value!r}")
        return float(value)

    def finite(self, value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(where, f"expected a number, got {value!r}")
        return float(value)

    def fraction(self, value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            self.fail(where, f"expected a number between 0 and 1, got {value!r}")
        return float(value)

    def boolean(self, value, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, f"expected true or false, got {value!r}")
        return value

    def dim(self, value, where: str) -> int | str:
        if value == "auto":
            return value
        return self.integer(value, where, minimum=1, maximum=4096)

    def integer_list(self, value, where: str, what: str, low: int = 1, high: int | None = None) -> tuple[int, ...]:
        """A non-empty list of integers in [low, high]; `what` says what was expected in the error."""
        if not isinstance(value, (list, tuple)) or not value:
            self.fail(where, f"expected {what}, got {value!r}")
        return tuple(self.integer(v, f"{where}[{i}]", low, high) for i, v in enumerate(value))

    def string_list(self, value, where: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(where, f"expected a list of column names, got {value!r}")
        return tuple(value)

    def path_value(self, value, where: str) -> str:
        """A path field: a URL or absolute path as it is, a relative one from the config's folder."""
        path = self.string(value, where)
        if "://" not in path and not os.path.isabs(path):
            path = _beside(self.path, path)
        return path

    # -- columns -------------------------------------------------------------------------------

    def column(self, value, where: str, columns: dict, label: LabelConfig | None = None) -> str:
        col = self.string(value, where)
        if col not in columns:
            self.fail(where, f"column {col!r} is not declared in input.columns ({', '.join(columns)})")
        if label is not None and col == label.column:
            self.fail(where, f"column {col!r} is the label; a feature cannot read it")
        return col

    def categorical_column(self, value, where: str, columns: dict, label: LabelConfig) -> str:
        col = self.column(value, where, columns, label)
        if columns[col] == "float":
            self.fail(where, f"column {col!r} is float: categorical features and crosses take string or int columns")
        return col

    def items(self, top: dict, section: str):
        value = top.get(section) or {}
        if not isinstance(value, dict):
            self.fail(section, "expected a mapping of feature name to settings")
        return value.items()

    # -- sections shared by both kinds of config -----------------------------------------------

    def input(self, raw) -> InputConfig:
        m = self.mapping(raw, "input", field_names(InputConfig), required=("format", "path", "columns"))

        get = with_defaults(m, InputConfig)

        fmt = self.string(m["format"], "input.format", INPUT_FORMATS)
        path = self.path_value(m["path"], "input.path")
        if not isinstance(m["columns"], dict):
            self.fail("input.columns", f"expected a mapping of column name to type, got {m['columns']!r}")
        cols = self.mapping(m["columns"], "input.columns", tuple(m["columns"]))
        if not cols:
            self.fail("input.columns", "at least one column is required")
        columns = {str(c): self.string(t, f"input.columns.{c}", COLUMN_TYPES) for c, t in cols.items()}
        delimiter = self.string(get("delimiter"), "input.delimiter")
        if len(delimiter) != 1 or delimiter in '\r\n"':
            self.fail("input.delimiter", f"expected a single character other than CR, LF and '\"', got {delimiter!r}")
        nulls = get("null_values")
        if not isinstance(nulls, (list, tuple)) or not all(isinstance(v, str) for v in nulls):
            self.fail("input.null_values", f"expected a list of strings, got {nulls!r}")
        defaults = self.mapping(m.get("defaults"), "input.defaults", tuple(columns))
        for col, value in defaults.items():
            expected = {"string": str, "int": int, "float": (int, float)}[columns[col]]
            if isinstance(value, bool) or not isinstance(value, expected):
                self.fail(f"input.defaults.{col}", f"expected a {columns[col]} default, got {value!r}")
        return InputConfig(
            format=fmt,
            path=path,
            columns=columns,
            header=self.boolean(get("header"), "input.header"),
            delimiter=delimiter,
            null_values=tuple(nulls),
            defaults=dict(defaults),
            max_field_bytes=self.integer(get("max_field_bytes"), "input.max_field_bytes", 1, 1 << 30),
            max_bad_fraction=self.fraction(get("max_bad_fraction"), "input.max_bad_fraction"),
        )

    def drift(self, raw) -> DriftLimits:
        m = self.mapping(raw, "drift", field_names(DriftLimits))
        return DriftLimits(**{k: None if v is None else self.fraction(v, f"drift.{k}") for k, v in m.items()})

    def init_from(self, raw, where: str) -> TableInit:
        m = self.mapping(raw, where, field_names(TableInit, exclude=("warm_start",)), required=("path",))
        return TableInit(
            path=self.path_value(m["path"], f"{where}.path"),
            trainable=self.boolean(m.get("trainable", default(TableInit, "trainable")), f"{where}.trainable"),
        )

    # -- supervised ----------------------------------------------------------------------------

    def config(self, raw) -> Config:
        top = self.mapping(
            raw, "", field_names(Config, exclude=("source",)) + ("task", "crosses"), required=("name", "input", "label")
        )
        self.string(top.get("task", "supervised"), "task", ("supervised", "collaborative"))
        name = self.string(top["name"], "name")
        inp = self.input(top["input"])
        columns = inp.columns
        label = self.label(top["label"], columns)
        split = self.split(top.get("split"), columns)
        categorical = [self.categorical(n, v, columns, label) for n, v in self.items(top, "categorical")]
        categorical += [self.cross(n, v, columns, label) for n, v in self.items(top, "crosses")]
        numeric = [self.numeric(n, v, columns, label) for n, v in self.items(top, "numeric")]
        training = self.training(top.get("training"))
        names = [f.name for f in categorical] + [n.name for n in numeric]
        names += [n.bucket_feature for n in numeric if n.bucketize]
        for feature_name in names:
            if not FEATURE_NAME.match(feature_name):
                self.fail(
                    feature_name, "a feature name must be letters, digits and underscores, not starting with a digit"
                )
            if names.count(feature_name) > 1:
                self.fail(feature_name, "feature name is used more than once")
            if feature_name in (label.column, LABEL_KEY):
                self.fail(feature_name, f"a feature cannot be named {feature_name!r} (the label's name)")
        if not names:
            self.fail("categorical", "the config declares no features")
        return Config(
            name=name,
            source=self.path,
            input=inp,
            label=label,
            split=split,
            categorical=tuple(categorical),
            numeric=tuple(numeric),
            training=training,
            description=str(top.get("description") or default(Config, "description")),
            drift=self.drift(top.get("drift")),
        )

    def label(self, raw, columns) -> LabelConfig:
        m = self.mapping(raw, "label", field_names(LabelConfig), required=("column", "task"))
        col = self.column(m["column"], "label.column", columns)
        task = self.string(m["task"], "label.task", TASKS)
        positive, threshold = m.get("positive"), m.get("threshold")
        if task == "binary":
            if columns[col] == "string" and threshold is not None:
                self.fail("label.threshold", f"column {col!r} is a string: name its positive value (label.positive)")
            if columns[col] == "string" and positive is None:
                self.fail("label.positive", "a binary task on a string column needs the positive value")
            if columns[col] != "string" and positive is not None:
                self.fail(
                    "label.positive",
                    f"column {col!r} is numeric: its non-zero values are the positives (or set label.threshold)",
                )
            if positive is not None:
                positive = str(positive)
            if threshold is not None:
                threshold = self.finite(threshold, "label.threshold")
        elif positive is not None or threshold is not None:
            field = "label.positive" if positive is not None else "label.threshold"
            self.fail(field, f"only a binary task takes a {field.split('.')[1]}")
        loss = m.get("loss")
        if loss is not None:
            if task != "regression":
                self.fail("label.loss", "only a regression task takes a loss (classification uses cross-entropy)")
            loss = self.string(loss, "label.loss", REGRESSION_LOSSES)
        if task == "regression" and columns[col] == "string":
            self.fail("label.column", f"a regression label must be numeric, column {col!r} is a string")
        if task == "multiclass" and columns[col] == "float":
            self.fail("label.column", f"a multiclass label must be a string or int column, {col!r} is float")
        return LabelConfig(
            column=col,
            task=task,
            positive=positive,
            threshold=threshold,
            loss=loss or ("mse" if task == "regression" else None),
        )

    def split(self, raw, columns) -> SplitConfig:
        m = self.mapping(raw, "split", field_names(SplitConfig))
        key = self.string_list(m.get("key", []), "split.key")
        for i, col in enumerate(key):
            self.column(col, f"split.key[{i}]", columns)
        return SplitConfig(
            eval_percent=self.integer(
                m.get("eval_percent", default(SplitConfig, "eval_percent")), "split.eval_percent", 1, 99
            ),
            key=key,
            salt=str(m.get("salt", default(SplitConfig, "salt"))),
        )

    def categorical(self, name, raw, columns, label) -> CategoricalFeature:
        where = f"categorical.{name}"
        allowed = ("column",) + field_names(CategoricalFeature, exclude=("name", "columns", "separator"))
        m = self.mapping(raw, where, allowed, required=("type",))
        col = self.categorical_column(m.get("column", name), f"{where}.column", columns, label)
        if m["type"] == "identity" and columns[col] != "int":
            self.fail(f"{where}.column", f"an identity feature needs an int column, {col!r} is {columns[col]}")
        return self._table(str(name), where, m, (col,))

    def cross(self, name, raw, columns, label) -> CategoricalFeature:
        where = f"crosses.{name}"
        allowed = field_names(CategoricalFeature, exclude=("name", "num_buckets"))
        m = self.mapping(raw, where, allowed, required=("columns", "type"))
        cols = self.string_list(m["columns"], f"{where}.columns")
        if len(cols) < 2:
            self.fail(f"{where}.columns", "a cross needs two or more columns")
        for i, col in enumerate(cols):
            self.categorical_column(col, f"{where}.columns[{i}]", columns, label)
        if m["type"] == "identity":
            self.fail(f"{where}.type", "a cross is hashed or looked up in a vocabulary, not identity")
        return self._table(str(name), where, m, cols)

    def _table(self, name, where, m, cols) -> CategoricalFeature:
        kind = self.string(m["type"], f"{where}.type", CATEGORICAL_TYPES)
        kwargs: dict[str, Any] = {"name": name, "type": kind, "columns": cols}
        kwargs["dim"] = self.dim(m.get("dim", default(CategoricalFeature, "dim")), f"{where}.dim")
        if "separator" in m:
            kwargs["separator"] = self.string(m["separator"], f"{where}.separator")
        needs = {
            "vocabulary": ("top_k", "min_count", "oov_buckets"),
            "identity": ("num_buckets",),
            "hash": ("hash_buckets",),
        }
        for key in ("top_k", "min_count", "oov_buckets", "num_buckets", "hash_buckets"):
            if key in m and key not in needs[kind]:
                self.fail(f"{where}.{key}", f"does not apply to type {kind} (it takes: {', '.join(needs[kind])})")
        if kind == "vocabulary":
            kwargs.update(self._vocabulary_limits(m, where, CategoricalFeature))
        elif kind == "identity":
            if "num_buckets" not in m:
                self.fail(f"{where}.num_buckets", "an identity feature needs num_buckets")
            kwargs["num_buckets"] = self.integer(m["num_buckets"], f"{where}.num_buckets", 1, MAX_TABLE_ROWS)
        else:
            if "hash_buckets" not in m:
                self.fail(f"{where}.hash_buckets", "a hash feature needs hash_buckets")
            kwargs["hash_buckets"] = self.integer(m["hash_buckets"], f"{where}.hash_buckets", 2, MAX_TABLE_ROWS)
        if m.get("init_from") is not None:
            kwargs["init_from"] = init = self.init_from(m["init_from"], f"{where}.init_from")
            kwargs["dim"] = self.transfer_dim(kwargs["dim"], init, where)
        return CategoricalFeature(**kwargs)

    def _vocabulary_limits(self, m: dict, where: str, cls) -> dict:
        """`top_k`, `min_count` and `oov_buckets` of a vocabulary (a feature, a cross, users, items)."""
        return {
            "top_k": self.optional_integer(m.get("top_k", default(cls, "top_k")), f"{where}.top_k", 1, MAX_TABLE_ROWS),
            "min_count": self.integer(m.get("min_count", default(cls, "min_count")), f"{where}.min_count"),
            "oov_buckets": self.integer(m.get("oov_buckets", default(cls, "oov_buckets")), f"{where}.oov_buckets"),
        }

    def transfer_dim(self, dim: int | str, init: TableInit, where: str) -> int | str:
        """The table's dim given its source table: `auto` becomes the source's dim, and an
        explicit dim must equal it. Checked here when the source is a local table that already
        exists; otherwise (not exported yet, or a remote path: reading it needs TensorFlow) the
        trainer checks it, and `auto` follows the usual rule until then."""
        manifest_path = os.path.join(init.path, "manifest.json")
        if "://" in init.path or not os.path.isfile(manifest_path):
            return dim
        try:
            with open(manifest_path, encoding="utf-8") as f:
                source_dim = json.load(f)["dim"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.fail(f"{where}.init_from.path", f"{manifest_path} is not an exported table manifest ({e!r})")
        if isinstance(source_dim, bool) or not isinstance(source_dim, int) or source_dim < 1:
            self.fail(f"{where}.init_from.path", f"{manifest_path}: dim is {source_dim!r}, not a positive integer")
        if dim != "auto" and dim != source_dim:
            self.fail(
                f"{where}.dim",
                f"is {dim} but the init_from table {init.path} has dim {source_dim}; set dim: {source_dim} or auto",
            )
        return source_dim

    def numeric(self, name, raw, columns, label) -> NumericFeature:
        where = f"numeric.{name}"
        m = self.mapping(raw, where, field_names(NumericFeature, exclude=("name",)))
        col = self.column(m.get("column", name), f"{where}.column", columns, label)
        if columns[col] == "string":
            self.fail(f"{where}.column", f"column {col!r} is a string; a numeric feature needs int or float")
        return NumericFeature(
            name=str(name),
            column=col,
            normalize=self.string(
                m.get("normalize", default(NumericFeature, "normalize")), f"{where}.normalize", ("zscore", "none")
            ),
            bucketize=self.optional_integer(
                m.get("bucketize", default(NumericFeature, "bucketize")), f"{where}.bucketize", 2, MAX_BUCKETIZE
            ),
            bucket_dim=self.dim(m.get("bucket_dim", default(NumericFeature, "bucket_dim")), f"{where}.bucket_dim"),
        )

    def training(self, raw) -> TrainingConfig:
        m = self.mapping(raw, "training", field_names(TrainingConfig))

        get = with_defaults(m, TrainingConfig)
        return TrainingConfig(
            batch_size=self.integer(get("batch_size"), "training.batch_size"),
            epochs=self.integer(get("epochs"), "training.epochs"),
            learning_rate=self.number(get("learning_rate"), "training.learning_rate"),
            hidden_units=self.integer_list(
                get("hidden_units"), "training.hidden_units", "a non-empty list of layer sizes"
            ),
            patience=self.integer(get("patience"), "training.patience"),
            seed=self.integer(get("seed"), "training.seed", 0),
            shuffle_buffer=self.integer(get("shuffle_buffer"), "training.shuffle_buffer"),
            cache_max_mb=self.integer(get("cache_max_mb"), "training.cache_max_mb", 0),
            validation_percent=self.integer(get("validation_percent"), "training.validation_percent", 1, 50),
        )

    # -- collaborative -------------------------------------------------------------------------

    def collaborative(self, raw: dict) -> CollaborativeConfig:
        sections = field_names(CollaborativeConfig, exclude=("source", "metadata") + INTERACTION_FIELDS)
        top = self.mapping(
            raw, "", sections + ("task", "interactions", "item_metadata"), required=("name", "input", "interactions")
        )
        inp = self.input(top["input"])
        columns = inp.columns
        m = self.mapping(
            top["interactions"], "interactions", INTERACTION_FIELDS, required=("user", "item", "timestamp")
        )

        get = with_defaults(m, CollaborativeConfig)

        user = self.side("user", m["user"], columns)
        item = self.side("item", m["item"], columns)
        timestamp = self.column(m["timestamp"], "interactions.timestamp", columns)
        if columns[timestamp] == "string":
            self.fail("interactions.timestamp", f"column {timestamp!r} must be int or float (e.g. epoch seconds)")
        weight = get("weight")
        if weight is not None:
            weight = self.column(weight, "interactions.weight", columns)
            if columns[weight] == "string":
                self.fail("interactions.weight", f"column {weight!r} must be numeric")
        training = self.retrieval_training(top.get("training"))
        if "auto" not in (user.dim, item.dim) and user.dim != item.dim:
            self.fail(
                "interactions.user.dim",
                f"user vectors are scored against item vectors (u . v): the user dim must equal the item dim ({item.dim})",
            )
        return CollaborativeConfig(
            name=self.string(top["name"], "name"),
            source=self.path,
            input=inp,
            user=user,
            item=item,
            timestamp=timestamp,
            weight=weight,
            holdout=self.integer(get("holdout"), "interactions.holdout", 1, 1000),
            max_history=self.integer(get("max_history"), "interactions.max_history", 1, 10_000),
            metadata=self.item_metadata(top.get("item_metadata")),
            training=training,
            evaluation=self.retrieval_evaluation(top.get("evaluation")),
            drift=self.drift(top.get("drift")),
            description=str(top.get("description") or default(CollaborativeConfig, "description")),
        )

    def side(self, name: str, raw, columns) -> VocabularySide:
        where = f"interactions.{name}"
        if isinstance(raw, str):
            raw = {"column": raw}
        m = self.mapping(raw, where, field_names(VocabularySide, exclude=("name", "init_from")), required=("column",))
        col = self.column(m["column"], f"{where}.column", columns)
        if columns[col] == "float":
            self.fail(f"{where}.column", f"column {col!r} is float; ids are string or int columns")
        return VocabularySide(
            name=name,
            column=col,
            **self._vocabulary_limits(m, where, VocabularySide),
            dim=self.dim(m.get("dim", default(VocabularySide, "dim")), f"{where}.dim"),
        )

    def item_metadata(self, raw) -> ItemMetadata | None:
        if raw is None:
            return None
        md = self.mapping(raw, "item_metadata", field_names(ItemMetadata), ("path", "key", "label"))
        return ItemMetadata(
            path=self.path_value(md["path"], "item_metadata.path"),
            format=self.string(
                md.get("format", default(ItemMetadata, "format")), "item_metadata.format", INPUT_FORMATS
            ),
            key=self.string(md["key"], "item_metadata.key"),
            label=self.string(md["label"], "item_metadata.label"),
        )

    def retrieval_evaluation(self, raw) -> RetrievalEvaluation:
        m = self.mapping(raw, "evaluation", field_names(RetrievalEvaluation))

        get = with_defaults(m, RetrievalEvaluation)
        return RetrievalEvaluation(
            k=self.integer_list(get("k"), "evaluation.k", "a list of cut-offs", 1, 10_000),
            users=self.optional_integer(get("users"), "evaluation.users"),
            validation_users=self.integer(get("validation_users"), "evaluation.validation_users", 0),
            validation_holdout=self.optional_integer(
                get("validation_holdout"), "evaluation.validation_holdout", 1, 1000
            ),
        )

    def retrieval_training(self, raw) -> RetrievalTraining:
        t = self.mapping(raw, "training", field_names(RetrievalTraining))

        get = with_defaults(t, RetrievalTraining)

        models = get("models")
        models = self.string_list(list(models) if isinstance(models, tuple) else models, "training.models")
        for i, model in enumerate(models):
            self.string(model, f"training.models[{i}]", RETRIEVAL_MODELS)
        batch_size = self.integer(get("batch_size"), "training.batch_size", 2)
        return RetrievalTraining(
            models=models,
            batch_size=batch_size,
            epochs=self.integer(get("epochs"), "training.epochs"),
            learning_rate=self.number(get("learning_rate"), "training.learning_rate"),
            seed=self.integer(get("seed"), "training.seed", 0),
            patience=self.integer(get("patience"), "training.patience"),
            shuffle_buffer=self.integer(get("shuffle_buffer"), "training.shuffle_buffer", 2),
            user_chunk=self.integer(get("user_chunk"), "training.user_chunk", 1, batch_size),
            refit=self.boolean(get("refit"), "training.refit"),
        )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key

"""Typed feature configuration: the dataclasses, the YAML loader and its validation.

Everything the pipeline, the trainer and the exporter know about a dataset comes from one
`Config`, loaded and validated once by `load_config`. Validation errors are `ConfigError`s whose
message names the file and the offending field, e.g.::

    schemas/taxi.yaml: categorical.company.top_k: expected a positive integer, got 'ten'

What belongs here: the config shape, its defaults and its checks. What does not: anything that
needs TensorFlow or Beam (see `pipeline.preprocessing` for how the config becomes a
`preprocessing_fn`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

COLUMN_TYPES = ("string", "int", "float")
INPUT_FORMATS = ("csv", "parquet")
TASKS = ("regression", "binary", "multiclass")
CATEGORICAL_TYPES = ("vocabulary", "identity", "hash")
REGRESSION_LOSSES = ("mse", "mae", "huber")
# Name of the transformed label; no feature may use it.
LABEL_KEY = "label"

# Embedding size rule of thumb: round(rows ** 0.25), clamped to this range. Below 2 a table
# cannot express similarity beyond a single axis; above 64 the rule is no longer the right tool
# (set an explicit `dim` instead).
AUTO_DIM_MIN = 2
AUTO_DIM_MAX = 64
MAX_TABLE_ROWS = 50_000_000
MAX_BUCKETIZE = 10_000
# No categorical value or number is this long; a longer one is a broken row (or a runaway field).
DEFAULT_MAX_FIELD_BYTES = 64 * 1024
DEFAULT_MAX_BAD_FRACTION = 0.1
# Feature names become vocabulary file names, Keras layer names and TensorBoard run names.
FEATURE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


def auto_embedding_dim(rows: int) -> int:
    """The default embedding size for a table of `rows` rows: round(rows ** 0.25), clamped."""
    return int(min(AUTO_DIM_MAX, max(AUTO_DIM_MIN, round(rows**0.25))))


@dataclass(frozen=True)
class InputConfig:
    """Where the raw logs are and what their columns hold."""

    format: str
    path: str
    columns: dict[str, str]
    header: bool = True
    delimiter: str = ","
    null_values: tuple[str, ...] = ("", "NA")
    defaults: dict[str, Any] = field(default_factory=dict)
    # A longer value (in bytes, as read) dead-letters its row as `oversized_field`.
    max_field_bytes: int = DEFAULT_MAX_FIELD_BYTES
    # More dead-lettered rows than this share of the rows read fails the run (after the job).
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION


@dataclass(frozen=True)
class LabelConfig:
    column: str
    task: str
    positive: str | None = None
    loss: str | None = None


@dataclass(frozen=True)
class SplitConfig:
    """Deterministic train/eval split: a row goes to eval when a fingerprint of its `key`
    columns (all input columns when empty) falls in the first `eval_percent` of 100 buckets."""

    eval_percent: int = 20
    key: tuple[str, ...] = ()
    salt: str = ""


@dataclass(frozen=True)
class TableInit:
    """`init_from` of a categorical feature or cross: start its table from an exported one.

    Rows are matched by key, not by position: a row whose key is in the source table starts
    with the source's vector, every other row keeps its fresh random initialisation, and OOV
    row i copies the source's OOV row i when both tables have one (see `trainer.train`).
    `trainable: false` (the default) freezes the whole table during training; `true` fine-tunes it.
    """

    path: str  # the exported table directory (`<output>/export/<table>`), absolute or a URL
    trainable: bool = False
    warm_start: bool = False  # set by `--warm-start`, not by the config file: not in `digest()`


@dataclass(frozen=True)
class CategoricalFeature:
    """One embedding table: a categorical column, or a cross of two or more columns."""

    name: str
    type: str
    columns: tuple[str, ...]
    dim: int | str = "auto"
    top_k: int | None = None
    min_count: int = 1
    oov_buckets: int = 1
    num_buckets: int | None = None
    hash_buckets: int | None = None
    separator: str = " x "
    init_from: TableInit | None = None

    @property
    def is_cross(self) -> bool:
        return len(self.columns) > 1

    @property
    def config_field(self) -> str:
        """Where the feature is in its config file, for error messages: `crosses.<name>` etc."""
        return f"{'crosses' if self.is_cross else 'categorical'}.{self.name}"

    def embedding_dim(self, rows: int) -> int:
        return auto_embedding_dim(rows) if self.dim == "auto" else int(self.dim)


@dataclass(frozen=True)
class NumericFeature:
    name: str
    column: str
    normalize: str = "zscore"
    bucketize: int | None = None
    bucket_dim: int | str = "auto"

    @property
    def bucket_feature(self) -> str:
        return f"{self.name}_bucket"


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 256
    epochs: int = 30
    learning_rate: float = 0.003
    hidden_units: tuple[int, ...] = (64, 32)
    patience: int = 3
    seed: int = 42


class DatasetConfig:
    """What every config kind shares: `name`, `source` (its file) and `input`."""

    def digest(self) -> str:
        """A sha256 of the parsed config (not of its file), stable across whitespace edits."""
        payload = dataclasses.asdict(self)
        payload.pop("source")
        # A warm start's sources change every day; the run is still "the same config".
        for table in [*payload.get("categorical", ()), payload.get("user"), payload.get("item")]:
            if table and table.get("init_from") and table["init_from"]["warm_start"]:
                table["init_from"] = None
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def with_input_path(self, path: str):
        return dataclasses.replace(self, input=dataclasses.replace(self.input, path=path))

    @property
    def raw_columns(self) -> list[str]:
        return list(self.input.columns)


@dataclass(frozen=True)
class DriftLimits:
    """`drift:` limits checked against the last published run before a run is published
    (`trainer.drift`); None = report only."""

    max_new_key_traffic: float | None = None  # share of training rows on keys the last run lacked
    max_frequency_linf: float | None = None  # largest change of one key's share of its table
    min_neighbor_overlap: float | None = None  # mean share of top-10 neighbours kept


@dataclass(frozen=True)
class Config(DatasetConfig):
    name: str
    source: str
    input: InputConfig
    label: LabelConfig
    split: SplitConfig
    categorical: tuple[CategoricalFeature, ...]
    numeric: tuple[NumericFeature, ...]
    training: TrainingConfig
    description: str = ""
    drift: DriftLimits = DriftLimits()

    @property
    def feature_columns(self) -> list[str]:
        """Raw columns the model reads at serving time (every input column but the label)."""
        return [c for c in self.input.columns if c != self.label.column]

    @property
    def tables(self) -> list[str]:
        """Names of every embedding table, in config order."""
        names = [f.name for f in self.categorical]
        names += [n.bucket_feature for n in self.numeric if n.bucketize]
        return names


@dataclass(frozen=True)
class VocabularySide:
    """Users or items of a collaborative config: the column and its vocabulary settings."""

    name: str  # "user" or "item": the table and vocabulary name
    column: str
    top_k: int | None = None
    min_count: int = 1
    oov_buckets: int = 1
    dim: int | str = "auto"
    init_from: TableInit | None = None  # set by warm start (`embedpipe run --warm-start`)

    def embedding_dim(self, rows: int) -> int:
        return auto_embedding_dim(rows) if self.dim == "auto" else int(self.dim)


@dataclass(frozen=True)
class ItemMetadata:
    """Optional per-item labels for the exports (e.g. titles); never used for training."""

    path: str
    format: str
    key: str
    label: str


@dataclass(frozen=True)
class RetrievalTraining:
    models: tuple[str, ...] = ("two_tower", "bag_of_history")
    batch_size: int = 1024
    epochs: int = 10
    learning_rate: float = 0.01
    seed: int = 42


@dataclass(frozen=True)
class CollaborativeConfig(DatasetConfig):
    """Interaction logs (who watched what, when) -> user and item embeddings.

    The last `holdout` interactions of every user (by `timestamp`) are the eval split; a train
    example is one interaction with the user's previous `max_history` items as its history.
    """

    name: str
    source: str
    input: InputConfig
    user: VocabularySide
    item: VocabularySide
    timestamp: str
    weight: str | None
    holdout: int
    max_history: int
    metadata: ItemMetadata | None
    training: RetrievalTraining
    eval_k: tuple[int, ...] = (10, 20)
    description: str = ""
    drift: DriftLimits = DriftLimits()

    @property
    def tables(self) -> list[str]:
        return [self.user.name, self.item.name]


RETRIEVAL_MODELS = ("two_tower", "bag_of_history")


# ----------------------------------------------------------------------------------------------
# Loading


def bundled_config_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("schemas").iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
    """A path to an existing file, or the name of a bundled config (`taxi`, `flights`)."""
    if os.path.isfile(name_or_path):
        return os.path.abspath(name_or_path)
    bundled = resources.files("schemas").joinpath(f"{name_or_path}.yaml")
    if bundled.is_file():
        return str(bundled)
    raise ConfigError(
        f"{name_or_path}: no such config file, and not a bundled config "
        f"(bundled: {', '.join(bundled_config_names())})"
    )


def load_config(name_or_path: str) -> Config | CollaborativeConfig:
    """Load and validate a config; raises ConfigError naming the file and field on any problem."""
    path = resolve_config_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    parser = _Parser(path)
    if isinstance(raw, dict) and raw.get("task") == "collaborative":
        return parser.collaborative(raw)
    return parser.config(raw)


class _Parser:
    """Walks the YAML tree with the field path at hand, so every error can name it."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, problem: str):
        raise ConfigError(f"{self.path}: {where}: {problem}")

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

    def number(self, value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            self.fail(where, f"expected a positive number, got {value!r}")
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

    def string_list(self, value, where: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(where, f"expected a list of column names, got {value!r}")
        return tuple(value)

    # -- sections ------------------------------------------------------------------------------

    def config(self, raw) -> Config:
        top = self.mapping(
            raw,
            "",
            ("name", "description", "task", "input", "label", "split", "categorical", "crosses", "numeric", "training", "drift"),
            required=("name", "input", "label"),
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
                self.fail(feature_name, "a feature name must be letters, digits and underscores, not starting with a digit")
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
            description=str(top.get("description") or ""),
            drift=self.drift(top.get("drift")),
        )

    def drift(self, raw) -> DriftLimits:
        m = self.mapping(raw, "drift", tuple(f.name for f in dataclasses.fields(DriftLimits)))
        return DriftLimits(**{k: None if v is None else self.fraction(v, f"drift.{k}") for k, v in m.items()})

    def collaborative(self, raw: dict) -> CollaborativeConfig:
        top = self.mapping(
            raw,
            "",
            ("name", "description", "task", "input", "interactions", "item_metadata", "training", "evaluation", "drift"),
            required=("name", "input", "interactions"),
        )
        inp = self.input(top["input"])
        columns = inp.columns
        m = self.mapping(
            top["interactions"],
            "interactions",
            ("user", "item", "timestamp", "weight", "holdout", "max_history"),
            required=("user", "item", "timestamp"),
        )
        user = self.side("user", m["user"], columns)
        item = self.side("item", m["item"], columns)
        timestamp = self.column(m["timestamp"], "interactions.timestamp", columns)
        if columns[timestamp] == "string":
            self.fail("interactions.timestamp", f"column {timestamp!r} must be int or float (e.g. epoch seconds)")
        weight = m.get("weight")
        if weight is not None:
            weight = self.column(weight, "interactions.weight", columns)
            if columns[weight] == "string":
                self.fail("interactions.weight", f"column {weight!r} must be numeric")
        metadata = None
        if top.get("item_metadata") is not None:
            md = self.mapping(top["item_metadata"], "item_metadata", ("path", "format", "key", "label"), ("path", "key", "label"))
            path = self.string(md["path"], "item_metadata.path")
            if "://" not in path and not os.path.isabs(path):
                path = os.path.normpath(os.path.join(os.path.dirname(self.path), path))
            metadata = ItemMetadata(
                path=path,
                format=self.string(md.get("format", "parquet"), "item_metadata.format", INPUT_FORMATS),
                key=self.string(md["key"], "item_metadata.key"),
                label=self.string(md["label"], "item_metadata.label"),
            )
        t = self.mapping(top.get("training"), "training", tuple(f.name for f in dataclasses.fields(RetrievalTraining)))
        d = RetrievalTraining()
        models = self.string_list(t.get("models", list(d.models)), "training.models")
        for i, model in enumerate(models):
            self.string(model, f"training.models[{i}]", RETRIEVAL_MODELS)
        if "two_tower" in models and "auto" not in (user.dim, item.dim) and user.dim != item.dim:
            self.fail("interactions.user.dim", f"two_tower scores u . v: the user dim must equal the item dim ({item.dim})")
        ev = self.mapping(top.get("evaluation"), "evaluation", ("k",))
        ks = ev.get("k", [10, 20])
        if not isinstance(ks, list) or not ks:
            self.fail("evaluation.k", f"expected a list of cut-offs, got {ks!r}")
        return CollaborativeConfig(
            name=self.string(top["name"], "name"),
            source=self.path,
            input=inp,
            user=user,
            item=item,
            timestamp=timestamp,
            weight=weight,
            holdout=self.integer(m.get("holdout", 2), "interactions.holdout", 1, 1000),
            max_history=self.integer(m.get("max_history", 50), "interactions.max_history", 1, 10_000),
            metadata=metadata,
            training=RetrievalTraining(
                models=models,
                batch_size=self.integer(t.get("batch_size", d.batch_size), "training.batch_size", 2),
                epochs=self.integer(t.get("epochs", d.epochs), "training.epochs"),
                learning_rate=self.number(t.get("learning_rate", d.learning_rate), "training.learning_rate"),
                seed=self.integer(t.get("seed", d.seed), "training.seed", 0),
            ),
            eval_k=tuple(self.integer(k, f"evaluation.k[{i}]", 1, 10_000) for i, k in enumerate(ks)),
            drift=self.drift(top.get("drift")),
            description=str(top.get("description") or ""),
        )

    def side(self, name: str, raw, columns) -> VocabularySide:
        where = f"interactions.{name}"
        if isinstance(raw, str):
            raw = {"column": raw}
        m = self.mapping(raw, where, ("column", "top_k", "min_count", "oov_buckets", "dim"), required=("column",))
        col = self.column(m["column"], f"{where}.column", columns)
        if columns[col] == "float":
            self.fail(f"{where}.column", f"column {col!r} is float; ids are string or int columns")
        return VocabularySide(
            name=name,
            column=col,
            top_k=None if m.get("top_k") is None else self.integer(m["top_k"], f"{where}.top_k", 1, MAX_TABLE_ROWS),
            min_count=self.integer(m.get("min_count", 1), f"{where}.min_count"),
            oov_buckets=self.integer(m.get("oov_buckets", 1), f"{where}.oov_buckets"),
            dim=self.dim(m.get("dim", "auto"), f"{where}.dim"),
        )

    def items(self, top: dict, section: str):
        value = top.get(section) or {}
        if not isinstance(value, dict):
            self.fail(section, "expected a mapping of feature name to settings")
        return value.items()

    def input(self, raw) -> InputConfig:
        m = self.mapping(
            raw,
            "input",
            (
                "format", "path", "columns", "header", "delimiter", "null_values", "defaults", "max_field_bytes",
                "max_bad_fraction",
            ),
            required=("format", "path", "columns"),
        )
        fmt = self.string(m["format"], "input.format", INPUT_FORMATS)
        path = self.string(m["path"], "input.path")
        if "://" not in path and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(os.path.dirname(self.path), path))
        if not isinstance(m["columns"], dict):
            self.fail("input.columns", f"expected a mapping of column name to type, got {m['columns']!r}")
        cols = self.mapping(m["columns"], "input.columns", tuple(m["columns"]))
        if not cols:
            self.fail("input.columns", "at least one column is required")
        columns = {str(c): self.string(t, f"input.columns.{c}", COLUMN_TYPES) for c, t in cols.items()}
        delimiter = self.string(m.get("delimiter", ","), "input.delimiter")
        if len(delimiter) != 1 or delimiter in '\r\n"':
            self.fail("input.delimiter", f"expected a single character other than CR, LF and '\"', got {delimiter!r}")
        nulls = m.get("null_values", ["", "NA"])
        if not isinstance(nulls, list) or not all(isinstance(v, str) for v in nulls):
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
            header=self.boolean(m.get("header", True), "input.header"),
            delimiter=delimiter,
            null_values=tuple(nulls),
            defaults=dict(defaults),
            max_field_bytes=self.integer(
                m.get("max_field_bytes", DEFAULT_MAX_FIELD_BYTES), "input.max_field_bytes", 1, 1 << 30
            ),
            max_bad_fraction=self.fraction(m.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION), "input.max_bad_fraction"),
        )

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

    def label(self, raw, columns) -> LabelConfig:
        m = self.mapping(raw, "label", ("column", "task", "positive", "loss"), required=("column", "task"))
        col = self.column(m["column"], "label.column", columns)
        task = self.string(m["task"], "label.task", TASKS)
        positive = m.get("positive")
        if task == "binary":
            if columns[col] == "string" and positive is None:
                self.fail("label.positive", "a binary task on a string column needs the positive value")
            if columns[col] != "string" and positive is not None:
                self.fail("label.positive", f"column {col!r} is numeric: its non-zero values are the positives")
            if positive is not None:
                positive = str(positive)
        elif positive is not None:
            self.fail("label.positive", "only a binary task takes a positive value")
        loss = m.get("loss")
        if loss is not None:
            if task != "regression":
                self.fail("label.loss", "only a regression task takes a loss (classification uses cross-entropy)")
            loss = self.string(loss, "label.loss", REGRESSION_LOSSES)
        if task == "regression" and columns[col] == "string":
            self.fail("label.column", f"a regression label must be numeric, column {col!r} is a string")
        if task == "multiclass" and columns[col] == "float":
            self.fail("label.column", f"a multiclass label must be a string or int column, {col!r} is float")
        return LabelConfig(column=col, task=task, positive=positive, loss=loss or ("mse" if task == "regression" else None))

    def split(self, raw, columns) -> SplitConfig:
        m = self.mapping(raw, "split", ("eval_percent", "key", "salt"))
        key = self.string_list(m.get("key", []), "split.key")
        for i, col in enumerate(key):
            self.column(col, f"split.key[{i}]", columns)
        return SplitConfig(
            eval_percent=self.integer(m.get("eval_percent", 20), "split.eval_percent", 1, 99),
            key=key,
            salt=str(m.get("salt", "")),
        )

    def categorical(self, name, raw, columns, label) -> CategoricalFeature:
        where = f"categorical.{name}"
        m = self.mapping(
            raw,
            where,
            ("column", "type", "dim", "top_k", "min_count", "oov_buckets", "num_buckets", "hash_buckets", "init_from"),
            required=("type",),
        )
        col = self.categorical_column(m.get("column", name), f"{where}.column", columns, label)
        if m["type"] == "identity" and columns[col] != "int":
            self.fail(f"{where}.column", f"an identity feature needs an int column, {col!r} is {columns[col]}")
        return self._table(str(name), where, m, (col,))

    def cross(self, name, raw, columns, label) -> CategoricalFeature:
        where = f"crosses.{name}"
        m = self.mapping(
            raw,
            where,
            ("columns", "type", "dim", "top_k", "min_count", "oov_buckets", "hash_buckets", "separator", "init_from"),
            required=("columns", "type"),
        )
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
        kwargs["dim"] = self.dim(m.get("dim", "auto"), f"{where}.dim")
        if "separator" in m:
            kwargs["separator"] = self.string(m["separator"], f"{where}.separator")
        needs = {"vocabulary": ("top_k", "min_count", "oov_buckets"), "identity": ("num_buckets",), "hash": ("hash_buckets",)}
        for key in ("top_k", "min_count", "oov_buckets", "num_buckets", "hash_buckets"):
            if key in m and key not in needs[kind]:
                self.fail(f"{where}.{key}", f"does not apply to type {kind} (it takes: {', '.join(needs[kind])})")
        if kind == "vocabulary":
            if m.get("top_k") is not None:
                kwargs["top_k"] = self.integer(m["top_k"], f"{where}.top_k", 1, MAX_TABLE_ROWS)
            kwargs["min_count"] = self.integer(m.get("min_count", 1), f"{where}.min_count")
            kwargs["oov_buckets"] = self.integer(m.get("oov_buckets", 1), f"{where}.oov_buckets")
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

    def init_from(self, raw, where: str) -> TableInit:
        m = self.mapping(raw, where, ("path", "trainable"), required=("path",))
        path = self.string(m["path"], f"{where}.path")
        if "://" not in path and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(os.path.dirname(self.path), path))
        return TableInit(path=path, trainable=self.boolean(m.get("trainable", False), f"{where}.trainable"))

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
        m = self.mapping(raw, where, ("column", "normalize", "bucketize", "bucket_dim"))
        col = self.column(m.get("column", name), f"{where}.column", columns, label)
        if columns[col] == "string":
            self.fail(f"{where}.column", f"column {col!r} is a string; a numeric feature needs int or float")
        bucketize = m.get("bucketize")
        return NumericFeature(
            name=str(name),
            column=col,
            normalize=self.string(m.get("normalize", "zscore"), f"{where}.normalize", ("zscore", "none")),
            bucketize=None if bucketize is None else self.integer(bucketize, f"{where}.bucketize", 2, MAX_BUCKETIZE),
            bucket_dim=self.dim(m.get("bucket_dim", "auto"), f"{where}.bucket_dim"),
        )

    def training(self, raw) -> TrainingConfig:
        m = self.mapping(raw, "training", tuple(f.name for f in dataclasses.fields(TrainingConfig)))
        d = TrainingConfig()
        hidden = m.get("hidden_units", list(d.hidden_units))
        if not isinstance(hidden, list) or not hidden:
            self.fail("training.hidden_units", f"expected a non-empty list of layer sizes, got {hidden!r}")
        return TrainingConfig(
            batch_size=self.integer(m.get("batch_size", d.batch_size), "training.batch_size"),
            epochs=self.integer(m.get("epochs", d.epochs), "training.epochs"),
            learning_rate=self.number(m.get("learning_rate", d.learning_rate), "training.learning_rate"),
            hidden_units=tuple(self.integer(h, f"training.hidden_units[{i}]") for i, h in enumerate(hidden)),
            patience=self.integer(m.get("patience", d.patience), "training.patience"),
            seed=self.integer(m.get("seed", d.seed), "training.seed", 0),
        )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key

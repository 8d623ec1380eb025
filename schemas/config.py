"""Typed feature configuration: the dataclasses every stage reads, with their defaults.

Everything the pipeline, the trainer and the exporter know about a dataset comes from one
`Config` (supervised) or `CollaborativeConfig`, loaded and validated once by
`schemas.loading.load_config`. Each default is written here once, as the dataclass field's
default; the loader takes its defaults and allowed keys from these fields.

What belongs here: the config shape, its defaults and the errors about what a user gave (a config,
its input). What does not: parsing YAML (`schemas.loading`), anything that needs TensorFlow or
Beam (see `pipeline.preprocessing` for how the config becomes a `preprocessing_fn`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

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
# The floor of `dim: auto` for a collaborative table. There the tables are the whole model (a
# user is scored against every item by one dot product), not one input among many as in a
# supervised model, and the fourth-root rule leaves them too small (MovieLens' 9,067 items get
# 10; the measured sweep is in docs/performance.md, "Embedding size of a collaborative table").
COLLABORATIVE_DIM_MIN = 32
MAX_TABLE_ROWS = 50_000_000
MAX_BUCKETIZE = 10_000
# No categorical value or number is this long; a longer one is a broken row (or a runaway field).
DEFAULT_MAX_FIELD_BYTES = 64 * 1024
DEFAULT_MAX_BAD_FRACTION = 0.1
# Feature names become vocabulary file names, Keras layer names and TensorBoard run names.
FEATURE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def auto_embedding_dim(rows: int, minimum: int = AUTO_DIM_MIN) -> int:
    """The default embedding size for a table of `rows` rows: round(rows ** 0.25), clamped to
    [`minimum`, AUTO_DIM_MAX] (`minimum` is COLLABORATIVE_DIM_MIN for a collaborative table)."""
    return int(min(AUTO_DIM_MAX, max(minimum, round(rows**0.25))))


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
    """What the supervised model predicts: a column and the task (`loss` for regressions).

    A binary label is 1 where a string column equals `positive`, where a numeric column is at
    least `threshold` (e.g. an arrival delay of 15 minutes or more), or else where a numeric
    column is non-zero.
    """

    column: str
    task: str
    positive: str | None = None
    threshold: float | None = None
    loss: str | None = None


@dataclass(frozen=True)
class SplitConfig:
    """Deterministic train/eval split: a row goes to eval when a fingerprint of its `key`
    columns (every used input column when empty, see `DatasetConfig.used_columns`) falls in the
    first `eval_percent` of 100 buckets."""

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
        """True for a cross of two or more columns."""
        return len(self.columns) > 1

    @property
    def config_field(self) -> str:
        """Where the feature is in its config file, for error messages: `crosses.<name>` etc."""
        return f"{'crosses' if self.is_cross else 'categorical'}.{self.name}"

    def embedding_dim(self, rows: int) -> int:
        """The dim of a table of `rows` rows: `dim`, or the fourth-root rule for `auto`."""
        return auto_embedding_dim(rows) if self.dim == "auto" else int(self.dim)


@dataclass(frozen=True)
class NumericFeature:
    """A numeric input: z-scored (or as is), and optionally also bucketized into its own table."""

    name: str
    column: str
    normalize: str = "zscore"
    bucketize: int | None = None
    bucket_dim: int | str = "auto"

    @property
    def bucket_feature(self) -> str:
        """The name of the bucketized feature's table."""
        return f"{self.name}_bucket"


@dataclass(frozen=True)
class TrainingConfig:
    """`training:` of a supervised config (early stopping after `patience` epochs without gain)."""

    batch_size: int = 256
    epochs: int = 30
    learning_rate: float = 0.003
    hidden_units: tuple[int, ...] = (64, 32)
    patience: int = 3
    seed: int = 42
    # Examples (serialized) held by the training split's shuffle buffer.
    shuffle_buffer: int = 200_000
    # A split is cached in memory after its first read only when its files are at most this big.
    cache_max_mb: int = 256
    # The share of the training split (a fixed slice, by a fingerprint of each example) held out
    # to choose the epoch (early stopping): the eval split is only ever reported on.
    validation_percent: int = 10


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
        """The same config reading `path` (`--input`)."""
        return dataclasses.replace(self, input=dataclasses.replace(self.input, path=path))

    @property
    def raw_columns(self) -> list[str]:
        """The input columns, in file order."""
        return list(self.input.columns)

    @property
    def used_columns(self) -> dict[str, str]:
        """{column: type} of the input columns that something reads, in file order.

        Only these are parsed, validated (a missing, malformed or oversized value dead-letters
        its row) and handed to tf.Transform; the other declared columns are checked by the
        header alone (a CSV header or a Parquet schema must name them) and never decide
        whether a row is kept. A column with a declared default counts as read.
        """
        read = self.read_columns() | set(self.input.defaults)
        return {c: t for c, t in self.input.columns.items() if c in read}

    def read_columns(self) -> set[str]:
        """The input columns this kind of config reads (its subclass says which)."""
        raise NotImplementedError


@dataclass(frozen=True)
class DriftLimits:
    """`drift:` limits checked against the last published run before a run is published
    (`trainer.drift`); None = report only."""

    max_new_key_traffic: float | None = None  # share of training rows on keys the last run lacked
    max_frequency_linf: float | None = None  # largest change of one key's share of its table
    min_neighbor_overlap: float | None = None  # mean share of top-10 neighbours kept


@dataclass(frozen=True)
class Config(DatasetConfig):
    """A supervised config: input columns, a label, and the tables and numeric features."""

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
        """Raw columns the model reads at serving time (every used input column but the label)."""
        return [c for c in self.used_columns if c != self.label.column]

    def read_columns(self) -> set[str]:
        """The label, every feature's and cross's columns, the numeric columns and the split key."""
        read = {self.label.column, *self.split.key}
        read.update(c for f in self.categorical for c in f.columns)
        read.update(n.column for n in self.numeric)
        return read

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
        """The dim of a table of `rows` rows: `dim`, or for `auto` the fourth-root rule with the
        collaborative floor (COLLABORATIVE_DIM_MIN)."""
        return auto_embedding_dim(rows, COLLABORATIVE_DIM_MIN) if self.dim == "auto" else int(self.dim)


@dataclass(frozen=True)
class ItemMetadata:
    """Optional per-item labels for the exports (e.g. titles); never used for training."""

    path: str
    key: str
    label: str
    format: str = "parquet"


RETRIEVAL_MODELS = ("two_tower", "bag_of_history", "self_attention")


@dataclass(frozen=True)
class RetrievalTraining:
    """`training:` of a collaborative config: which models to train, and how."""

    models: tuple[str, ...] = ("two_tower", "bag_of_history")  # of RETRIEVAL_MODELS; self_attention is opt-in
    batch_size: int = 1024
    epochs: int = 30  # at most: training stops when the validation metric stops improving
    learning_rate: float = 0.01
    seed: int = 42
    patience: int = 3  # epochs without a better validation metric before a model stops
    shuffle_buffer: int = 65_536  # training pairs shuffled together (a pool of whole users)
    # bag_of_history: > 1 cuts this many consecutive targets of one user out together; their
    # history windows overlap, so an item row is read once per chunk, not once per target
    # (~2x faster epochs at 5M interactions, but a lower NDCG@20 on MovieLens); 1: independent pairs
    user_chunk: int = 1
    refit: bool = True  # after early stopping, train anew on every pair for the chosen epochs


@dataclass(frozen=True)
class RetrievalEvaluation:
    """`evaluation:` of a collaborative config.

    Test metrics rank every item for the users with a holdout (or a deterministic sample of
    `users` of them); the validation slice for early stopping and model choice is carved from
    the training data: the last `validation_holdout` training interactions of up to
    `validation_users` users, left out of training while they choose (then, with
    `training.refit`, the chosen models are trained anew on every pair).
    """

    k: tuple[int, ...] = (10, 20)
    users: int | None = None  # evaluate on a sample of this many eval users (None: all)
    validation_users: int = 5000
    validation_holdout: int | None = None  # None: the interactions' `holdout`

    @property
    def headline(self) -> str:
        """The metric that picks the best epoch and the best model: recall@20 (else the largest K)."""
        return f"recall@{20 if 20 in self.k else max(self.k)}"


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
    training: RetrievalTraining
    weight: str | None = None
    holdout: int = 2
    max_history: int = 50
    metadata: ItemMetadata | None = None
    evaluation: RetrievalEvaluation = RetrievalEvaluation()
    description: str = ""
    drift: DriftLimits = DriftLimits()

    @property
    def tables(self) -> list[str]:
        return [self.user.name, self.item.name]

    def read_columns(self) -> set[str]:
        """The user, item and timestamp columns, and the weight column when configured."""
        return {self.user.column, self.item.column, self.timestamp} | ({self.weight} if self.weight else set())

"""What each embedding table is: its size, its embedding dimension and the key of every row.

The single place that knows how the transform laid out a table's rows, shared by the run
manifest (the Beam job), the trainer (table sizes) and the exporter (row keys):

* vocabulary (and vocabulary cross): rows 0..V-1 are the vocabulary file's lines, most frequent
  first, then one row per OOV bucket, keyed `<OOV 0>`, `<OOV 1>`, ...;
* identity: rows 0..N-1 are keyed by the id itself, then one `<OOV>` row for out-of-range ids;
* hash (and hashed cross): N rows keyed `<hash 0>`, ... (many raw values share a bucket);
* bucketized numeric: N rows keyed `<bucket 0>`, ... (quantile buckets, lowest first).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import tensorflow_transform as tft

from schemas.config import CollaborativeConfig, Config, auto_embedding_dim
from schemas.layout import table_manifest


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: `rows` x `dim`, the first `vocabulary_size` rows keyed by the
    vocabulary (vocabulary tables), the last `oov_rows` for values outside it."""

    name: str
    kind: str  # vocabulary | identity | hash | bucket
    columns: tuple[str, ...]
    rows: int
    dim: int
    vocabulary_size: int | None = None
    oov_rows: int = 0
    separator: str | None = None  # a cross's: its keys are its columns' values joined with it

    def to_json_dict(self) -> dict:
        d = asdict(self)
        d["columns"] = list(self.columns)
        return d

    @classmethod
    def from_json_dict(cls, d: dict) -> TableSpec:
        return cls(**{**d, "columns": tuple(d["columns"])})


def table_specs(config: Config | CollaborativeConfig, tft_output: tft.TFTransformOutput) -> list[TableSpec]:
    """Sizes and dimensions of every table, read from the transform output.

    Args:
        config: the run's config (supervised or collaborative).
        tft_output: the run's tf.Transform output (its vocabularies give the table sizes).

    Returns:
        One spec per table: supervised in config order (features, crosses, then bucketized
        numeric features); collaborative `user` then `item`.
    """
    if isinstance(config, CollaborativeConfig):
        specs = []
        for side in (config.item, config.user):
            vocab = tft_output.vocabulary_size_by_name(side.name)
            rows = vocab + side.oov_buckets
            # Users and items share one space: an `auto` user dimension follows the items'.
            if side.init_from and side.dim == "auto":
                dim = _source_dim(side.init_from.path)  # a warm start keeps yesterday's dim
            elif side is config.user and side.dim == "auto":
                dim = specs[0].dim
            else:
                dim = side.embedding_dim(rows)
            specs.append(TableSpec(side.name, "vocabulary", (side.column,), rows, dim, vocab, side.oov_buckets))
        return specs[::-1]
    specs = []
    for f in config.categorical:
        if f.type == "vocabulary":
            vocab = tft_output.vocabulary_size_by_name(f.name)
            rows, oov = vocab + f.oov_buckets, f.oov_buckets
        elif f.type == "identity":
            vocab, rows, oov = None, f.num_buckets + 1, 1
        else:
            vocab, rows, oov = None, f.hash_buckets, 0
        dim = _source_dim(f.init_from.path) if f.init_from and f.dim == "auto" else f.embedding_dim(rows)
        specs.append(TableSpec(f.name, f.type, f.columns, rows, dim, vocab, oov, f.separator if f.is_cross else None))
    for n in config.numeric:
        if n.bucketize:
            dim = auto_embedding_dim(n.bucketize) if n.bucket_dim == "auto" else int(n.bucket_dim)
            specs.append(TableSpec(n.bucket_feature, "bucket", (n.column,), n.bucketize, dim))
    return specs


def _source_dim(path: str) -> int:
    """The dim of the exported table an `init_from` names (`auto` follows it), else 0 so that
    the trainer reports the missing table with the config field."""
    manifest = table_manifest(path)
    return 0 if manifest is None else int(manifest["dim"])


def table_keys(spec: TableSpec, tft_output: tft.TFTransformOutput) -> list[str]:
    """The key of every row of a table, in row order (len == spec.rows, all distinct)."""
    if spec.kind == "vocabulary":
        vocab = [_decode(t) for t in tft_output.vocabulary_by_name(spec.name)]
        keys = vocab + [f"<OOV {i}>" for i in range(spec.oov_rows)]
        if len(set(keys)) != len(keys):
            clash = sorted(set(vocab) & set(keys[len(vocab) :]))
            raise ValueError(f"table {spec.name}: the value(s) {clash} collide with the OOV row keys")
        return keys
    if spec.kind == "identity":
        return [str(i) for i in range(spec.rows - 1)] + ["<OOV>"]
    label = "hash" if spec.kind == "hash" else "bucket"
    return [f"<{label} {i}>" for i in range(spec.rows)]


def _decode(token) -> str:
    return token.decode("utf-8", "backslashreplace") if isinstance(token, bytes) else str(token)

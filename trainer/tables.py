"""Load an exported embedding table (the downstream side of `trainer.export`).

    from trainer.tables import load_table

    table = load_table("embedpipe_output/taxi/LATEST/export/dow_x_hour")   # or runs/<id>/export/...
    table.vector("Tue x 2")          # np.ndarray [dim], float32
    table["Tue x 2"]                 # the same
    table.keys, table.vectors        # every key in row order, the [rows, dim] matrix
    table.frequencies                # occurrences of each row in the training split
    table.labels                     # per-row labels (item titles) or None
    table.path                       # where it was loaded from (LATEST resolved once)
    table.as_dict()                  # {key: vector}

`match_rows` lines up a new table's rows with an exported table's by key (transfer learning and
warm start).

Loading checks the files it reads (keys, vectors, Parquet) against the sha256 in the table's
`manifest.json` and the matrix and keys against its declared shape, and fails with `TableError`
naming the file otherwise. `verify_table` checks every file and the shapes without loading the
table (what `embedpipe publish` does). Nothing in the table directory is executed or unpickled.
Keys and vectors are read with `tf.io.gfile`, the Parquet file with pyarrow's filesystems
(`trainer.streams`: local, gs://, hdfs://).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from schemas.errors import ConfigError, TableError
from schemas.layout import resolve, table_manifest
from trainer.streams import input_file

FILES = {
    "keys": "keys.tsv",
    "vectors": "vectors.npy",
    "parquet": "table.parquet",
    "projector_config": "projector_config.pbtxt",
    "projector_tensor": "vectors.tsv",
    "projector_metadata": "metadata.tsv",
    # One constant event so TensorBoard counts the table directory as a run: the projector only
    # reads projector_config.pbtxt of runs (and of the logdir root).
    "projector_run": "events.out.tfevents.0.embedpipe",
}

_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r", "s": " "}


class UnknownKeyError(TableError, KeyError):
    """A key (or label) that is not in the table. Also a `KeyError`, as for a dict."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def escape_key(key: str, space: bool = False) -> str:
    """A key as written on one line of keys.tsv / metadata.tsv (`space=True`: also ` ` -> `\\s`,
    for the word2vec file, whose fields are separated by spaces)."""
    escaped = "".join(_ESCAPES.get(c, c) for c in key)
    return escaped.replace(" ", "\\s") if space else escaped


def unescape_key(text: str) -> str:
    """The key `escape_key` wrote as `text`."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _UNESCAPES:
            out.append(_UNESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def bad_vocabulary_key(keys: list[str]) -> str | None:
    """The first key a line-based vocabulary cannot hold (empty, or holding CR or LF), else None.
    tf.Transform never puts such values in a vocabulary."""
    return next((k for k in keys if not k or "\n" in k or "\r" in k), None)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 [rows, dim] scaled to unit length (cosine = dot product); a zero row stays zero."""
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def sha256_file(path: str) -> str:
    """The hex sha256 of a file (any filesystem TensorFlow reads), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class EmbeddingTable:
    """One exported table in memory: row i is `keys[i]` -> `vectors[i]` (see the module docstring)."""

    name: str
    keys: list[str]
    vectors: np.ndarray
    frequencies: np.ndarray
    manifest: dict
    labels: list[str] | None = None  # e.g. item titles, from the projector metadata
    path: str | None = None  # the directory it was loaded from (a `LATEST` path resolved)
    _index: dict[str, int] | None = field(init=False, repr=False, compare=False, default=None)

    def _rows(self) -> dict[str, int]:
        """{key: row}, built on the first lookup by key (a 500,000-row table's is ~20 MB)."""
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index

    @property
    def dim(self) -> int:
        """The vectors' dimension."""
        return int(self.vectors.shape[1])

    def row(self, key: str) -> int:
        """The row of `key`; raises `UnknownKeyError` for a key the table does not have."""
        try:
            return self._rows()[key]
        except KeyError:
            raise UnknownKeyError(f"table {self.name!r} has no key {key!r}") from None

    def label(self, row: int) -> str:
        """The label of row `row`; "" for a table without labels."""
        return self.labels[row] if self.labels else ""

    def vector(self, key: str) -> np.ndarray:
        """The vector of `key`, float32 [dim]; raises `UnknownKeyError` for an unknown key."""
        return self.vectors[self.row(key)]

    __getitem__ = vector

    def __contains__(self, key: str) -> bool:
        return key in self._rows()

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def oov_rows(self) -> int:
        """The trailing rows for values outside the vocabulary (`<OOV 0>`, ... or `<OOV>`)."""
        return int(self.manifest.get("oov_rows") or 0)

    @property
    def real_rows(self) -> int:
        """Rows that stand for actual values: all but the trailing OOV rows."""
        return len(self.keys) - self.oov_rows

    def as_dict(self) -> dict[str, np.ndarray]:
        """{key: vector} for every row."""
        return {k: self.vectors[i] for i, k in enumerate(self.keys)}


def load_table(path: str, verify: bool = True) -> EmbeddingTable:
    """Reads `<export>/<table>/` (keys, vectors and frequencies); see the module docstring.

    Args:
        path: the table's directory (local, gs://, ...; a `LATEST` path is resolved once).
        verify: check the files read here (keys, vectors, Parquet) against the manifest's sha256
            (False: only the shapes).

    Returns:
        The table; `TableError` naming the file when it is missing, damaged or of another shape.
    """
    path = resolve(path)  # ROOT/LATEST/export/<table> -> the latest published run's table
    manifest = _manifest(path)
    if verify:
        _check_files(path, manifest, ("keys", "vectors", "parquet"))
    keys_path = os.path.join(path, FILES["keys"])
    with tf.io.gfile.GFile(keys_path) as f:
        keys = f.read().split("\n")  # every key ends with a line feed: the last piece is empty
    _check_keys(keys_path, manifest, len(keys) - 1, keys.pop() == "")
    if any("\\" in k for k in keys):  # only a key with a backslash holds an escape
        keys = [unescape_key(k) if "\\" in k else k for k in keys]
    vectors_path = os.path.join(path, FILES["vectors"])
    with tf.io.gfile.GFile(vectors_path, "rb") as f:
        vectors = np.load(f, allow_pickle=False)
    _check_vectors(vectors_path, manifest, vectors.shape, vectors.dtype)
    with input_file(os.path.join(path, FILES["parquet"])) as f:  # only these columns are read
        parquet = pq.ParquetFile(f)
        columns = [c for c in ("frequency", "label") if c in parquet.schema_arrow.names]
        parquet = parquet.read(columns=columns)
    frequencies = parquet.column("frequency").to_numpy()
    labels = parquet.column("label").to_pylist() if "label" in parquet.column_names else None
    return EmbeddingTable(manifest["name"], keys, vectors, frequencies, manifest, labels, path)


def verify_table(path: str) -> dict:
    """Checks every file of `<export>/<table>/` against its manifest without loading the table:
    each file's sha256, the matrix's shape (the `.npy` header) and the number of keys (lines of
    keys.tsv). What `embedpipe publish` does; its memory does not grow with the table.

    Returns:
        The table's manifest.

    Raises:
        TableError: naming the file that is missing, damaged or of another shape.
    """
    path = resolve(path)
    manifest = _manifest(path)
    _check_files(path, manifest, None)
    vectors_path = os.path.join(path, FILES["vectors"])
    with tf.io.gfile.GFile(vectors_path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in _NPY_HEADERS:
                raise ValueError(f"format version {version}, not one np.save writes for float32")
            shape, _, dtype = _NPY_HEADERS[version](f)
        except ValueError as e:
            raise TableError(f"{vectors_path}: not a .npy file np.load reads: {e}") from None
    _check_vectors(vectors_path, manifest, shape, dtype)
    keys_path = os.path.join(path, FILES["keys"])
    lines, last = 0, b"\n"
    with tf.io.gfile.GFile(keys_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            lines, last = lines + block.count(b"\n"), block[-1:]
    _check_keys(keys_path, manifest, lines, last == b"\n")
    return manifest


def _check_vectors(path: str, manifest: dict, shape: tuple, dtype: np.dtype) -> None:
    """TableError unless the vectors at `path` are float32 of the manifest's [rows, dim]."""
    expected = (manifest["rows"], manifest["dim"])
    if tuple(shape) != expected or dtype != np.float32:
        raise TableError(f"{path}: {dtype} {tuple(shape)}, the manifest declares float32 {expected}")


def _check_keys(path: str, manifest: dict, keys: int, ends_with_newline: bool) -> None:
    """TableError unless keys.tsv at `path` holds the manifest's rows, each ended by a line feed."""
    if not ends_with_newline:
        raise TableError(f"{path}: text after the last line feed (a truncated or appended-to file)")
    if keys != manifest["rows"]:
        raise TableError(f"{path}: {keys} keys, the manifest declares {manifest['rows']} rows")


def _manifest(path: str) -> dict:
    manifest = table_manifest(path)
    if manifest is None:
        raise TableError(f"{os.path.join(path, 'manifest.json')}: missing; is {path!r} an exported table directory?")
    return manifest


def _check_files(path: str, manifest: dict, names: tuple[str, ...] | None) -> None:
    """Each of the manifest's files named `names` (None: all) against its sha256; TableError naming
    the first file that is missing or damaged."""
    manifest_path = os.path.join(path, "manifest.json")
    for name, entry in manifest["files"].items():
        if names is not None and name not in names:
            continue
        file_path = os.path.join(path, entry["path"])
        if not tf.io.gfile.exists(file_path):
            raise TableError(f"{file_path}: missing (listed in {manifest_path})")
        if sha256_file(file_path) != entry["sha256"]:
            raise TableError(f"{file_path}: checksum does not match {manifest_path}; the file is damaged")


def load_source(path: str, dim: int, where: str, what: str = "init_from") -> EmbeddingTable:
    """The exported table at `path` that a new table of dim `dim` starts from (`init_from`, warm
    start); ConfigError naming the config field `where` when it is missing or has another dim."""
    if table_manifest(path) is None:
        raise ConfigError(
            f"{where}.init_from.path: no exported table at {path} (run `embedpipe export` on the source run first)"
        )
    source = load_table(path)
    if source.dim != dim:
        raise ConfigError(
            f"{where}.dim: the table has dim {dim} but the {what} table {path} has dim {source.dim}; "
            f"set dim: {source.dim} (dim: auto takes the source's dim when the table exists as the config is loaded)"
        )
    return source


@dataclass(frozen=True)
class RowMatch:
    """Which rows of a new table start from which rows of a source table."""

    rows: np.ndarray  # int64 rows of the new table, matched keys first, then OOV rows
    source_rows: np.ndarray  # the source row each of them copies
    matched_keys: int  # how many of `rows` were matched by key (the rest are OOV rows)

    @property
    def oov_rows(self) -> int:
        """How many OOV rows copy the source's."""
        return len(self.rows) - self.matched_keys


def match_rows(keys: list[str], oov_rows: int, source_keys: list[str], source_oov_rows: int) -> RowMatch:
    """Matches a new table's rows to a source table's: the real (non-OOV) rows by key, and OOV
    row i to the source's OOV row i where both exist. OOV rows are the last `oov_rows` of each
    table (`<OOV 0>`, ... or `<OOV>`); a real key never matches an OOV row."""
    real, source_real = len(keys) - oov_rows, len(source_keys) - source_oov_rows
    index = {key: i for i, key in enumerate(source_keys[:source_real])}
    pairs = [(i, index[key]) for i, key in enumerate(keys[:real]) if key in index]
    matched = len(pairs)
    pairs += [(real + i, source_real + i) for i in range(min(oov_rows, source_oov_rows))]
    rows = np.array([i for i, _ in pairs], dtype=np.int64)
    source_rows = np.array([j for _, j in pairs], dtype=np.int64)
    return RowMatch(rows, source_rows, matched)

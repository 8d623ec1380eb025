"""pyarrow streams in and out of the filesystems a run lives on (local, gs://, hdfs://).

Parquet files are read and written through pyarrow's own filesystems rather than whole through
a `tf.io.gfile` buffer and a bytes copy of it: a file streams in row groups and column chunks (a
reader fetches only the columns it asks for).

gs:// goes to `STORAGE_EMULATOR_HOST` (anonymously) when that is set, as google-cloud-storage
and Beam's GcsIO do: a local GCS emulator.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for `path` and the path in it (see the module docstring).

    Args:
        path: a local path or a URI (gs://bucket/..., hdfs://...).

    Returns:
        (filesystem, the path within it).
    """
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if path.startswith("gs://") and emulator:
        scheme, _, host = emulator.rpartition("://")
        fs = pafs.GcsFileSystem(anonymous=True, scheme=scheme or "http", endpoint_override=host.rstrip("/"))
        return fs, path.removeprefix("gs://")
    return pafs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))


def output_stream(path: str):
    """A pyarrow output stream writing `path` (a context manager): what is written goes out as
    it is written."""
    fs, where = filesystem(path)
    return fs.open_output_stream(where)


def input_file(path: str):
    """A seekable pyarrow input file reading `path` (a context manager)."""
    fs, where = filesystem(path)
    return fs.open_input_file(where)

"""The run manifest: one JSON file at the root of a run's output directory.

Each stage merges its own section into `<output>/manifest.json` (`preprocess`, `train`,
`export`), so the file always describes what is on disk next to it: inputs, row counts per split
and dead-letter reason, table sizes, the config hash, package versions and stage timings.
"""

from __future__ import annotations

import json
import os
import uuid
from importlib import metadata

import tensorflow as tf

MANIFEST = "manifest.json"
PACKAGES = ("embedpipe", "apache-beam", "tensorflow", "tensorflow-transform", "tfx-bsl", "keras", "pyarrow", "numpy")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_manifest(output_dir: str) -> dict:
    path = os.path.join(output_dir, MANIFEST)
    return read_json(path) if tf.io.gfile.exists(path) else {}


def drop_sections(output_dir: str, sections) -> None:
    """Removes `sections` from the manifest (if there is one)."""
    manifest = read_manifest(output_dir)
    if any(s in manifest for s in sections):
        _write(output_dir, {k: v for k, v in manifest.items() if k not in sections})


def update_manifest(output_dir: str, section: str, data: dict) -> dict:
    """Replaces `section` of the manifest with `data` and writes it back; returns the manifest."""
    manifest = read_manifest(output_dir)
    manifest[section] = data
    manifest["package_versions"] = package_versions()
    _write(output_dir, manifest)
    return manifest


def _write(output_dir: str, manifest: dict) -> None:
    tf.io.gfile.makedirs(output_dir)
    write_json_atomically(os.path.join(output_dir, MANIFEST), manifest)


def read_json(path: str) -> dict:
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def write_json_atomically(path: str, data: dict) -> None:
    """Writes `data` to a temporary name and renames it over `path`: readers see the old file or
    the new one, never a partial one."""
    temp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(temp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tf.io.gfile.rename(temp, path, overwrite=True)

"""The run manifest: one JSON file at the root of a run directory (`schemas.layout.MANIFEST`).

Each stage merges its own section into `<run>/manifest.json` (`preprocess`, `train`, `baseline`,
`export`, and `drift` at publish), so the file always describes what is on disk next to it:
inputs, row counts per split and dead-letter reason, table sizes, the config hash, package
versions and stage timings.
"""

from __future__ import annotations

import os
from importlib import metadata

import tensorflow as tf

from schemas.layout import MANIFEST, read_json, write_json_atomically

PACKAGES = ("embedpipe", "apache-beam", "tensorflow", "tensorflow-transform", "tfx-bsl", "keras", "pyarrow", "numpy")


def package_versions() -> dict[str, str]:
    """{package: installed version, or "not installed"} for the packages a run depends on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_manifest(output_dir: str) -> dict:
    """The run's manifest; {} when it has none yet."""
    path = os.path.join(output_dir, MANIFEST)
    return read_json(path) if tf.io.gfile.exists(path) else {}


def drop_sections(output_dir: str, sections) -> None:
    """Removes `sections` from the manifest (if there is one)."""
    manifest = read_manifest(output_dir)
    if any(s in manifest for s in sections):
        _write(output_dir, {k: v for k, v in manifest.items() if k not in sections})


def update_manifest(output_dir: str, section: str, data: dict) -> dict:
    """Replaces `section` of the manifest with `data` and writes it back atomically.

    Returns:
        The whole manifest as written.
    """
    manifest = read_manifest(output_dir)
    manifest[section] = data
    manifest["package_versions"] = package_versions()
    _write(output_dir, manifest)
    return manifest


def _write(output_dir: str, manifest: dict) -> None:
    tf.io.gfile.makedirs(output_dir)
    write_json_atomically(os.path.join(output_dir, MANIFEST), manifest)

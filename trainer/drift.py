"""Drift between a new run's tables and the last published run's, before the new one is published.

Per table present in both runs (`compare_tables`):

* vocabulary drift: keys added and removed (real rows; OOV/hash/bucket rows are not keys), the
  share of the new run's training occurrences that fall on keys the old run did not have
  (`new_key_traffic`), and the L-infinity distance between the two frequency distributions
  (`frequency_linf`: the largest change of any key's share of its table's occurrences, OOV rows
  included, compared by row key); for hash and bucket tables only `frequency_linf` and the
  neighbour overlap (their row keys name buckets, not values);
* embedding stability: for up to `NEIGHBOR_SAMPLE` keys present in both (the most frequent), the
  mean share of a key's top-`NEIGHBOR_K` cosine neighbours in the old table that are still among
  its top-`NEIGHBOR_K` in the new one (`neighbor_overlap`; 1 = the same neighbourhoods).

`check_thresholds` turns the config's `drift:` limits into one clear error per breach; the run
then stops before publishing, so `LATEST` stays on the previous run.
"""

from __future__ import annotations

import logging

import numpy as np

from schemas import layout
from schemas.manifest import read_manifest
from trainer.neighbors import NeighborIndex
from trainer.tables import EmbeddingTable, load_table

_LOG = logging.getLogger(__name__)
NEIGHBOR_K = 10
NEIGHBOR_SAMPLE = 1000


def compare_runs(run_dir: str, previous_dir: str) -> dict:
    """The `drift` manifest section: every table both runs exported, compared."""
    new, old = (read_manifest(d).get("export", {}).get("tables", {}) for d in (run_dir, previous_dir))
    tables = {}
    for name in sorted(set(new) & set(old)):
        pair = [load_table(layout.table_dir(d, name), verify=False) for d in (run_dir, previous_dir)]
        tables[name] = compare_tables(*pair)  # both verified: this run by `publish`, the last when it was
        t = tables[name]
        _LOG.info(
            "drift %s: keys +%s/-%s, share of rows on new keys %s, L-inf %.4f, neighbour overlap %s",
            name,
            t["keys_added"],
            t["keys_removed"],
            t["new_key_traffic"],
            t["frequency_linf"],
            t["neighbor_overlap"],
        )
    return {"against": previous_dir, "tables": tables, "not_compared": sorted(set(new) ^ set(old))}


def compare_tables(new: EmbeddingTable, old: EmbeddingTable) -> dict:
    """Drift of one table (see the module docstring)."""
    new_keys, old_keys = set(new.keys[: new.real_rows]), set(old.keys[: old.real_rows])
    keyed = new.manifest.get("kind") not in ("hash", "bucket")  # `<hash 3>` names a bucket, not a value
    added, removed = (new_keys - old_keys, old_keys - new_keys) if keyed else (None, None)
    total_new = max(int(new.frequencies.sum()), 1)
    total_old = max(int(old.frequencies.sum()), 1)
    new_share = {k: f / total_new for k, f in zip(new.keys, new.frequencies.tolist())}
    old_share = {k: f / total_old for k, f in zip(old.keys, old.frequencies.tolist())}
    linf = max(
        (abs(new_share.get(k, 0.0) - old_share.get(k, 0.0)) for k in set(new_share) | set(old_share)), default=0.0
    )
    new_traffic = sum(new_share[k] for k in added) if keyed else None
    common = [k for k in new.keys[: new.real_rows] if k in old_keys]
    common.sort(key=lambda k: -new.frequencies[new.row(k)])
    overlap = _neighbor_overlap(new, old, common[:NEIGHBOR_SAMPLE])
    return {
        "keys": len(new_keys),
        "previous_keys": len(old_keys),
        "keys_added": None if added is None else len(added),
        "keys_removed": None if removed is None else len(removed),
        "new_key_traffic": None if new_traffic is None else round(new_traffic, 6),
        "frequency_linf": round(linf, 6),
        "neighbor_overlap": None if overlap is None else round(overlap, 4),
        "neighbor_keys_compared": min(len(common), NEIGHBOR_SAMPLE) if overlap is not None else 0,
        "examples_added": sorted(added or (), key=lambda k: -new.frequencies[new.row(k)])[:5],
        "examples_removed": sorted(removed or (), key=lambda k: -old.frequencies[old.row(k)])[:5],
    }


def _neighbor_overlap(new: EmbeddingTable, old: EmbeddingTable, keys: list[str]) -> float | None:
    k = min(NEIGHBOR_K, new.real_rows - 1, old.real_rows - 1)
    if not keys or k < 1:
        return None
    top_new = NeighborIndex(new).nearest_keys([new.row(key) for key in keys], k)
    top_old = NeighborIndex(old).nearest_keys([old.row(key) for key in keys], k)
    shares = [len(set(a) & set(b)) / k for a, b in zip(top_new, top_old)]
    return float(np.mean(shares))


def check_thresholds(drift: dict, limits, source: str) -> None:
    """Raises `RunError` naming the config field of the first exceeded `drift:` limit."""
    checks = (
        (
            "max_new_key_traffic",
            "new_key_traffic",
            lambda v, lim: v > lim,
            "of the training rows are on keys the last run did not have",
        ),
        ("max_frequency_linf", "frequency_linf", lambda v, lim: v > lim, "is the largest change of a key's share"),
        (
            "min_neighbor_overlap",
            "neighbor_overlap",
            lambda v, lim: v < lim,
            f"of the top-{NEIGHBOR_K} neighbours are unchanged",
        ),
    )
    for field, metric, breached, meaning in checks:
        limit = getattr(limits, field)
        if limit is None:
            continue
        for table, values in drift["tables"].items():
            value = values.get(metric)
            if value is not None and breached(value, limit):
                raise layout.RunError(
                    f"{source}: drift.{field}: table {table}: {value:.4g} {meaning} (limit {limit:g}); "
                    f"compared with {drift['against']}; not published"
                )

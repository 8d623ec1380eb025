"""Synthetic movie watch logs with planted structure, for tests and benchmarks of collaborative
embeddings (item embeddings learned from user watch histories).

This module holds only the generator and its writer; nothing in the pipeline depends on it.
The structure a good embedding should recover:

* every item (movie) belongs to exactly one group ("genre"); groups are balanced (sizes differ
  by at most one) and assigned through a random permutation, so item numbers say nothing;
* within a group, item popularity follows a Zipf-like law: the item of in-group rank r (0 = most
  popular) has weight 1 / (r + 1) ** popularity_exponent; every group carries about the same
  total weight, and the same weights, normalised over all items, are the global popularity;
* every user has two distinct favourite groups; each interaction is, with probability
  `in_group_share`, an item from one of the two (each with probability 1/2, by in-group
  popularity) and otherwise any item by global popularity. The mixture never changes over
  time, so a user's last interactions are predictable from the earlier ones;
* a user never watches an item twice: a repeat is dropped and redrawn from the same branch
  (favourite groups or global) by popularity; after a few rounds uniformly within the branch,
  and at last uniformly over all items, which always ends because a user watches at most half
  of the items. Keeping the branch keeps the in-group share at `in_group_share`;
* interactions per user are 5 + a geometric number, with mean `mean_interactions`;
* timestamps (int64 seconds) are strictly increasing per user, inside one user-specific active
  span within a one-year window starting 2023-01-01 UTC, so users interleave; the
  interactions table is sorted by time;
* ratings (float32, half stars in 1..5) are higher when the item lies in one of the user's
  favourite groups (whether it came from the in-group or the global draw).

Everything is vectorised with numpy and pyarrow.compute (no per-user or per-interaction Python
loops), and the output is a pure function of the arguments: same seed, bitwise-identical tables.
The item catalogue depends only on (num_items, num_groups, popularity_exponent, seed), not on
the user parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

START_TS = 1_672_531_200  # 2023-01-01T00:00:00Z
YEAR_SECONDS = 365 * 24 * 3600
MIN_INTERACTIONS = 5
SECONDARY_GENRE_SHARE = 0.3  # share of items whose `genres` also lists a second, random group
_TOP_UP_ROUNDS = 8  # repeat-redraw rounds per stage (popularity, then uniform in the branch)


@dataclass(frozen=True)
class WatchLogs:
    """Generated logs plus the planted ground truth.

    interactions: user (string "u000123"), item (string "m000042"), ts (int64 seconds),
        rating (float32, 1..5); sorted by ts.
    items: item (string), title (string "Group 3 movie 42": group and in-group popularity rank),
        genres (string "g3" or "g3|g7", the item's own group first); row i is item number i.
    item_group: int64 [num_items], the group of each item, indexed by item number.
    user_groups: int64 [num_users, 2], the two favourite groups of each user.
    """

    interactions: pa.Table
    items: pa.Table
    item_group: np.ndarray
    user_groups: np.ndarray


def _ids(prefix: str, count: int) -> pa.Array:
    """["<prefix>000000", ...]: zero-padded to 6 digits, wider when count needs it."""
    width = max(6, len(str(max(count - 1, 0))))
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(count, dtype=np.int64)), pa.string()), width, "0")
    return pc.binary_join_element_wise(prefix, digits, "")


def _validate(num_users, num_items, num_groups, mean_interactions, popularity_exponent, in_group_share):
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    if num_items < 2 * MIN_INTERACTIONS:
        raise ValueError(f"num_items must be >= {2 * MIN_INTERACTIONS}, got {num_items}")
    if not 1 <= num_groups <= num_items:
        raise ValueError(f"num_groups must be in [1, num_items], got {num_groups}")
    if not mean_interactions >= MIN_INTERACTIONS:
        raise ValueError(f"mean_interactions must be >= {MIN_INTERACTIONS}, got {mean_interactions}")
    if not popularity_exponent >= 0:
        raise ValueError(f"popularity_exponent must be >= 0, got {popularity_exponent}")
    if not 0.0 <= in_group_share <= 1.0:
        raise ValueError(f"in_group_share must be in [0, 1], got {in_group_share}")


def generate_watch_logs(
    num_users: int = 2000,
    num_items: int = 1000,
    num_groups: int = 10,
    mean_interactions: float = 30,
    popularity_exponent: float = 1.0,
    in_group_share: float = 0.85,
    seed: int = 0,
) -> WatchLogs:
    """Generates watch logs with the structure described in the module docstring.

    Expect about num_users * mean_interactions interactions (a user's count is capped at
    num_items // 2). With num_groups == 1 both favourite groups are group 0.
    """
    _validate(num_users, num_items, num_groups, mean_interactions, popularity_exponent, in_group_share)
    U, N, G = int(num_users), int(num_items), int(num_groups)
    item_rng, user_rng, draw_rng, time_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))

    # --- Items: balanced random groups, Zipf weights by in-group rank. -----------------------
    perm = item_rng.permutation(N)  # item perm[k] gets group k % G and in-group rank k // G
    k = np.arange(N, dtype=np.int64)
    item_group = np.empty(N, dtype=np.int64)
    item_group[perm] = k % G
    item_rank = np.empty(N, dtype=np.int64)
    item_rank[perm] = k // G
    # Items laid out by (group, rank): `layout[pos]` is an item number; group g is the slice
    # group_start[g]:group_start[g + 1], most popular first.
    layout = perm[np.argsort(k % G, kind="stable")]
    group_size = np.bincount(item_group, minlength=G)
    group_start = np.concatenate([[0], np.cumsum(group_size)])
    weight = 1.0 / (item_rank[layout] + 1.0) ** popularity_exponent
    cum = np.cumsum(weight)
    ends = cum[group_start[1:] - 1]
    before = np.concatenate([[0.0], ends[:-1]])
    layout_group = item_group[layout]
    in_cdf = (cum - before[layout_group]) / (ends - before)[layout_group]
    in_cdf[group_start[1:] - 1] = 1.0
    in_keys = layout_group + in_cdf  # increasing; group g's keys lie in (g, g + 1]
    # Global popularity: the same weights, each group scaled to equal mass.
    global_cdf = np.cumsum(weight / (ends - before)[layout_group] / G)
    global_cdf[-1] = 1.0

    secondary = np.full(N, -1, dtype=np.int64)
    if G > 1:
        has_second = item_rng.random(N) < SECONDARY_GENRE_SHARE
        secondary[has_second] = (item_group[has_second] + item_rng.integers(1, G, size=int(has_second.sum()))) % G

    # --- Users: two favourite groups and an interaction count. -------------------------------
    first = user_rng.integers(0, G, size=U)
    second = (first + user_rng.integers(1, G, size=U)) % G if G > 1 else first.copy()
    user_groups = np.stack([first, second], axis=1).astype(np.int64)
    extra_mean = float(mean_interactions) - MIN_INTERACTIONS
    if extra_mean > 0:
        counts = MIN_INTERACTIONS - 1 + user_rng.geometric(1.0 / (extra_mean + 1.0), size=U)
    else:
        counts = np.full(U, MIN_INTERACTIONS, dtype=np.int64)
    counts = np.minimum(counts, N // 2).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    S = int(offsets[-1])
    slot_user = np.repeat(np.arange(U, dtype=np.int32), counts)  # slots are grouped by user

    # --- Items of each slot: mixture draw, then redraw repeats until none is left. -----------
    # A slot keeps its branch (favourite groups or global) when redrawn, so repeats do not push
    # the in-group share down; each branch is thus sampled without replacement by popularity.
    # Stages: popularity draws, then uniform within the branch, then uniform over all items.
    slot_in = draw_rng.random(S) < in_group_share

    def draw(users: np.ndarray, in_group: np.ndarray, stage: int) -> np.ndarray:
        n = users.size
        if stage == 2:
            return draw_rng.integers(0, N, size=n)
        fav = user_groups[users, draw_rng.integers(0, 2, size=n)][in_group]
        u = draw_rng.random(n)
        u_in, u_out = u[in_group], u[~in_group]
        pos = np.empty(n, dtype=np.int64)
        if stage == 0:
            found = np.searchsorted(in_keys, fav + u_in, side="right")
            pos[in_group] = np.minimum(found, group_start[fav + 1] - 1)
            pos[~in_group] = np.minimum(np.searchsorted(global_cdf, u_out, side="right"), N - 1)
        else:
            pos[in_group] = group_start[fav] + np.minimum(u_in * group_size[fav], group_size[fav] - 1).astype(np.int64)
            pos[~in_group] = np.minimum(u_out * N, N - 1).astype(np.int64)
        return layout[pos]

    slot_item = draw(slot_user, slot_in, stage=0)
    check = np.arange(S)  # slots of users that may still hold repeats
    rounds = 0
    while check.size:
        key = slot_user[check].astype(np.int64) * N + slot_item[check]
        order = np.argsort(key, kind="stable")  # stable: the earliest slot of a repeat is kept
        sorted_key = key[order]
        repeats = np.sort(check[order[1:][sorted_key[1:] == sorted_key[:-1]]])
        if not repeats.size:
            break
        stage = min(rounds // _TOP_UP_ROUNDS, 2)
        slot_item[repeats] = draw(slot_user[repeats], slot_in[repeats], stage)
        rounds += 1
        redo = np.zeros(U, dtype=bool)
        redo[slot_user[repeats]] = True
        check = np.flatnonzero(redo[slot_user])

    # --- Timestamps: sorted uniform draws in the user's active span, plus position. ----------
    span = np.floor(YEAR_SECONDS * time_rng.uniform(0.2, 1.0, size=U)).astype(np.int64)
    start = np.floor((YEAR_SECONDS - span) * time_rng.random(U)).astype(np.int64)
    room = span - counts  # positions 0..n-1 are added after sorting, keeping ts < start + span
    offset = start[slot_user] + np.floor(room[slot_user] * time_rng.random(S)).astype(np.int64)
    offset = np.sort((slot_user.astype(np.int64) << 32) | offset) & 0xFFFFFFFF  # sort within user
    position = np.arange(S, dtype=np.int64) - offsets[:-1][slot_user]
    ts = START_TS + offset + position

    # --- Ratings: higher inside the user's favourite groups, plus a per-item quality. --------
    g = item_group[slot_item]
    liked = (g == user_groups[slot_user, 0]) | (g == user_groups[slot_user, 1])
    quality = item_rng.normal(0.0, 0.3, size=N)
    noise = draw_rng.normal(0.0, 1.0, size=S)
    rating = np.where(liked, 4.0 + 0.6 * noise, 2.8 + 0.9 * noise) + quality[slot_item]
    rating = (np.clip(np.round(rating * 2.0) / 2.0, 1.0, 5.0)).astype(np.float32)

    # --- Tables. -----------------------------------------------------------------------------
    by_time = np.argsort(ts, kind="stable")  # ties keep user order
    user_ids, item_ids = _ids("u", U), _ids("m", N)
    interactions = pa.table(
        {
            "user": user_ids.take(pa.array(slot_user[by_time])),
            "item": item_ids.take(pa.array(slot_item[by_time])),
            "ts": pa.array(ts[by_time], type=pa.int64()),
            "rating": pa.array(rating[by_time], type=pa.float32()),
        }
    )
    group_str = pc.cast(pa.array(item_group), pa.string())
    title = pc.binary_join_element_wise("Group ", group_str, " movie ", pc.cast(pa.array(item_rank), pa.string()), "")
    primary = pc.binary_join_element_wise("g", group_str, "")
    second_str = pc.binary_join_element_wise("|g", pc.cast(pa.array(secondary), pa.string()), "")
    genres = pc.if_else(pa.array(secondary >= 0), pc.binary_join_element_wise(primary, second_str, ""), primary)
    items = pa.table({"item": item_ids, "title": title, "genres": genres})
    return WatchLogs(interactions=interactions, items=items, item_group=item_group, user_groups=user_groups)


def write_watch_logs(logs: WatchLogs, output_dir: str, fmt: str = "parquet") -> tuple[str, str]:
    """Writes `interactions.<fmt>` and `items.<fmt>` (fmt: parquet or csv) into output_dir,
    creating it if needed; returns (interactions path, items path)."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
    os.makedirs(output_dir, exist_ok=True)
    paths = (os.path.join(output_dir, f"interactions.{fmt}"), os.path.join(output_dir, f"items.{fmt}"))
    for table, path in zip((logs.interactions, logs.items), paths):
        write_input_table(table, path)
    return paths


# Rows per Parquet row group in the example inputs: a reader splits a file by row group (a whole
# group goes to one worker), so a file of one big group could be read by one worker only.
PARQUET_ROW_GROUP_ROWS = 65536


def write_input_table(table: pa.Table, path: str) -> None:
    """Writes an example input file as the format its extension names (`.parquet` or `.csv`)."""
    if path.endswith(".parquet"):
        pq.write_table(table, path, row_group_size=PARQUET_ROW_GROUP_ROWS)
        return
    # Values are quoted only when some value needs it (a delimiter, quote or line break): a plain
    # file is easier to read, and so are its dead-letter rows.
    special = any(
        pc.any(pc.match_substring_regex(column, '[,"\\r\\n]')).as_py()
        for column in table.columns
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    )
    if special:
        pacsv.write_csv(table, path)
        return
    with open(path, "wb") as f:  # pyarrow quotes the header's names even with quoting_style "none"
        f.write((",".join(table.column_names) + "\n").encode())
        pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False, quoting_style="none"))

"""Synthetic watch logs: deterministic, well-formed, and carrying the planted structure."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from pipeline.synthetic import START_TS, YEAR_SECONDS, WatchLogs, generate_watch_logs, write_watch_logs

NUM_USERS, NUM_ITEMS, NUM_GROUPS, SHARE, SEED = 600, 1000, 10, 0.85, 3


@pytest.fixture(scope="module")
def logs() -> WatchLogs:
    return generate_watch_logs(num_users=NUM_USERS, num_items=NUM_ITEMS, num_groups=NUM_GROUPS, seed=SEED)


def numbers(column: pa.ChunkedArray) -> np.ndarray:
    """ "u000123" -> 123."""
    return pc.cast(pc.utf8_slice_codeunits(column, 1), pa.int64()).to_numpy()


def columns(logs: WatchLogs):
    t = logs.interactions
    return numbers(t["user"]), numbers(t["item"]), t["ts"].to_numpy(), t["rating"].to_numpy()


def in_favourites(logs: WatchLogs, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    group = logs.item_group[item]
    return (group == logs.user_groups[user, 0]) | (group == logs.user_groups[user, 1])


def test_same_seed_is_bitwise_identical_and_other_seed_differs(logs):
    again = generate_watch_logs(num_users=NUM_USERS, num_items=NUM_ITEMS, num_groups=NUM_GROUPS, seed=SEED)
    assert again.interactions.equals(logs.interactions)
    assert again.items.equals(logs.items)
    np.testing.assert_array_equal(again.item_group, logs.item_group)
    np.testing.assert_array_equal(again.user_groups, logs.user_groups)
    other = generate_watch_logs(num_users=NUM_USERS, num_items=NUM_ITEMS, num_groups=NUM_GROUPS, seed=SEED + 1)
    assert not other.interactions.equals(logs.interactions)


def test_schemas_and_shapes(logs):
    assert logs.interactions.schema == pa.schema(
        [("user", pa.string()), ("item", pa.string()), ("ts", pa.int64()), ("rating", pa.float32())]
    )
    assert logs.items.schema == pa.schema([("item", pa.string()), ("title", pa.string()), ("genres", pa.string())])
    assert logs.items.num_rows == NUM_ITEMS
    assert logs.item_group.shape == (NUM_ITEMS,) and logs.item_group.dtype.kind == "i"
    assert logs.user_groups.shape == (NUM_USERS, 2) and logs.user_groups.dtype.kind == "i"
    assert logs.interactions["user"][0].as_py().startswith("u") and len(logs.interactions["user"][0].as_py()) == 7
    assert logs.items["item"].to_pylist()[:2] == ["m000000", "m000001"]


def test_items_table_matches_planted_groups(logs):
    assert np.array_equal(numbers(logs.items["item"]), np.arange(NUM_ITEMS))
    assert np.bincount(logs.item_group, minlength=NUM_GROUPS).tolist() == [NUM_ITEMS // NUM_GROUPS] * NUM_GROUPS
    for item, title, genres in zip(*(logs.items[c].to_pylist() for c in ("item", "title", "genres"))):
        group = logs.item_group[int(item[1:])]
        assert title.startswith(f"Group {group} movie ")
        parts = genres.split("|")
        assert parts[0] == f"g{group}" and len(parts) <= 2 and len(set(parts)) == len(parts)
    favourites = logs.user_groups
    assert np.all(favourites[:, 0] != favourites[:, 1])
    assert favourites.min() >= 0 and favourites.max() < NUM_GROUPS


def test_every_interacted_item_exists_and_no_user_watches_twice(logs):
    user, item, _, _ = columns(logs)
    assert set(logs.interactions["item"].to_pylist()) <= set(logs.items["item"].to_pylist())
    assert user.max() < NUM_USERS
    assert np.unique(user * NUM_ITEMS + item).size == user.size


def test_interaction_counts_vary_around_the_mean_with_a_minimum(logs):
    counts = np.bincount(columns(logs)[0], minlength=NUM_USERS)
    assert counts.min() >= 5
    assert 27 <= counts.mean() <= 33
    assert counts.std() > 10  # they vary


def test_timestamps_strictly_increase_per_user_and_interleave(logs):
    user, _, ts, _ = columns(logs)
    assert np.all(np.diff(ts) >= 0)  # the log is sorted by time
    assert ts.min() >= START_TS and ts.max() < START_TS + YEAR_SECONDS
    order = np.lexsort((ts, user))
    same_user = np.diff(user[order]) == 0
    assert np.all(np.diff(ts[order])[same_user] > 0)
    assert np.mean(np.diff(user) != 0) > 0.9  # consecutive rows mostly belong to different users


def test_share_inside_favourite_groups_is_in_group_share_plus_chance(logs):
    user, item, _, _ = columns(logs)
    expected = SHARE + (1 - SHARE) * 2 / NUM_GROUPS
    assert abs(in_favourites(logs, user, item).mean() - expected) < 0.03
    # Without the planted preference, only chance remains.
    flat = generate_watch_logs(num_users=300, num_items=NUM_ITEMS, num_groups=NUM_GROUPS, in_group_share=0.0, seed=SEED)
    user, item, _, _ = columns(flat)
    assert abs(in_favourites(flat, user, item).mean() - 2 / NUM_GROUPS) < 0.03


def test_item_popularity_is_skewed_and_follows_the_exponent(logs):
    counts = np.sort(np.bincount(columns(logs)[1], minlength=NUM_ITEMS))[::-1]
    assert counts[: NUM_ITEMS // 10].sum() / counts.sum() > 0.30
    flat = generate_watch_logs(num_users=300, num_items=NUM_ITEMS, popularity_exponent=0.0, seed=SEED)
    counts = np.sort(np.bincount(columns(flat)[1], minlength=NUM_ITEMS))[::-1]
    assert counts[: NUM_ITEMS // 10].sum() / counts.sum() < 0.20


def test_ratings_are_half_stars_and_higher_inside_favourite_groups(logs):
    user, item, _, rating = columns(logs)
    assert rating.min() >= 1.0 and rating.max() <= 5.0
    assert np.all(rating * 2 == np.round(rating * 2))
    liked = in_favourites(logs, user, item)
    assert rating[liked].mean() - rating[~liked].mean() > 0.8


def test_last_interactions_are_predictable_from_earlier_ones(logs):
    user, item, ts, _ = columns(logs)
    order = np.lexsort((ts, user))
    user, group = user[order], logs.item_group[item[order]]
    starts = np.searchsorted(user, np.arange(NUM_USERS))
    ends = np.append(starts[1:], user.size)
    position_from_end = ends[user] - np.arange(user.size)  # 1 = the user's last interaction
    last, history = position_from_end <= 3, position_from_end > 3
    # Each user's two most watched groups in their history, versus the groups of the last three.
    counts = np.zeros((NUM_USERS, NUM_GROUPS), dtype=np.int64)
    np.add.at(counts, (user[history], group[history]), 1)
    top2 = np.argsort(-counts, axis=1, kind="stable")[:, :2]
    hit = (group[last] == top2[user[last], 0]) | (group[last] == top2[user[last], 1])
    assert hit.mean() > 0.8
    recovered = np.all(np.sort(top2, axis=1) == np.sort(logs.user_groups, axis=1), axis=1)
    assert recovered.mean() > 0.85  # the history alone names both favourite groups


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_write_watch_logs_round_trips(logs, tmp_path, fmt):
    interactions_path, items_path = write_watch_logs(logs, str(tmp_path / "out"), fmt=fmt)
    assert interactions_path == str(tmp_path / "out" / f"interactions.{fmt}")
    assert items_path == str(tmp_path / "out" / f"items.{fmt}")
    if fmt == "parquet":
        assert pq.read_table(interactions_path).equals(logs.interactions)
        assert pq.read_table(items_path).equals(logs.items)
    else:
        types = {"user": pa.string(), "item": pa.string(), "ts": pa.int64(), "rating": pa.float32()}
        read = pcsv.read_csv(interactions_path, convert_options=pcsv.ConvertOptions(column_types=types))
        assert read.equals(logs.interactions)
        assert pcsv.read_csv(items_path).equals(logs.items)


def test_an_unknown_format_is_refused(logs, tmp_path):
    with pytest.raises(ValueError):
        write_watch_logs(logs, str(tmp_path), fmt="json")


@pytest.mark.parametrize(
    "bad", [dict(num_items=5), dict(num_groups=0), dict(in_group_share=1.5), dict(mean_interactions=2)]
)
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        generate_watch_logs(num_users=10, **bad)

"""tf.data input of the collaborative trainer: per-user sequence records in, training pairs and
evaluation blocks out, streamed (nothing holds a whole split).

The records are those of `pipeline.collaborative` (`schemas.features.transformed_sequence_spec`).

* `training_pairs`: every training target of a record with the `max_history` items before it
  as its history (right-aligned, padded with -1), shuffled: shards in a random order, read in
  parallel, records through a shuffle buffer, and the pairs of a pool of records (about
  `pool_pairs`) permuted together before they are cut into batches, so one batch mixes many
  users. The validation targets (`Validation`) are left out.
  With `chunk` > 1 (bag_of_history, `training.user_chunk`) the pool is cut into chunks of up
  to `chunk` consecutive training targets of one record instead, each with the `max_history`
  items before its first target: the targets' history windows overlap, so a chunk's item rows
  are read once rather than once per target (`BagOfHistory.sequence_queries`). The chunks are
  permuted and batched like pairs; a batch's targets are then those of `batch_size // chunk`
  chunks.
* `validation_blocks`: for the validation users, the last `validation_holdout` training items of
  their (last) train record as targets, the items before them as history and seen set.
* `eval_blocks`: the eval records (held-out targets), optionally a deterministic sample of users.
* `user_histories`: every user's whole history (held-out items included), for the export.

Shapes: a pair batch is {"user": int64 [B], "history": int64 [B, H], "target": int64 [B],
"weight": float32 [B], "has_history": bool [B], "valid": bool [B] (False: padding, in the last
batch of a pool)}; a chunk batch has "sequence": int64 [C, H + chunk] (the H items before the
chunk's first target, then its targets; -1 where there is none or the target is not trained on)
instead of "history", and B = C * chunk (target i of chunk c is entry c * chunk + i); a block is {"user": int64 [b], "history": int64
[b, H], "seen": ragged int64 [b, (n)], "targets": ragged int64 [b, (t)]}.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from schemas.features import WEIGHTS, transformed_sequence_spec
from trainer.data import read_records, record_files

# Entries of a pool's history matrix [pairs, max_history] (int64): bounds a pool's memory (128 MB).
MAX_POOL_ENTRIES = 16 << 20
_GOLDEN = 2654435761  # Knuth's multiplicative hash: users -> a deterministic uniform sample


def sampled(user: tf.Tensor, share: float, salt: int) -> tf.Tensor:
    """True for a deterministic `share` of users (by a hash of their row and `salt`)."""
    if share >= 1:
        return tf.ones_like(user, tf.bool)
    hashed = ((user + salt) * _GOLDEN) % (1 << 32)
    return hashed < int(share * (1 << 32))


@dataclass(frozen=True)
class Validation:
    """Which users give the validation slice: a `share` of the users whose last train record
    keeps more than `holdout` training targets; their last `holdout` targets are never trained on."""

    share: float
    holdout: int

    def users(self, user: tf.Tensor, last: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        """bool [n]: the records that give up their last `holdout` targets to validation."""
        if self.share <= 0:
            return tf.zeros_like(user, tf.bool)
        return (last == 1) & (targets > self.holdout) & sampled(user, self.share, salt=1)


def _parse(serialized: tf.Tensor, weighted: bool) -> dict:
    return tf.io.parse_example(serialized, transformed_sequence_spec(weighted))


def windows(items: tf.RaggedTensor, positions: tf.Tensor, rows: tf.Tensor, history: int) -> tf.Tensor:
    """The `history` items before each of `positions` in row `rows` of `items`, right-aligned.

    Args:
        items: int64 ragged [records, (items)].
        positions: int64 [n], positions in their record.
        rows: int64 [n], the record of each position.
        history: H.

    Returns:
        int64 [n, H]: column H-1 is the item just before the position; -1 where there is none.
    """
    offsets = tf.range(-history, 0, dtype=tf.int64)[None, :]
    where = positions[:, None] + offsets
    flat = tf.gather(items.row_splits, rows)[:, None] + tf.maximum(where, 0)
    return tf.where(where >= 0, tf.gather(items.flat_values, flat), tf.constant(-1, tf.int64))


def _pairs(records: dict, history: int, validation: Validation, weighted: bool, seed) -> dict:
    """Every training pair of a pool of parsed records, permuted (stateless, by `seed`)."""
    items = records["items"]
    start, stop = _trained(records, validation)
    counts = tf.maximum(stop - start, 0)
    rows = tf.repeat(tf.range(tf.shape(start, out_type=tf.int64)[0]), counts)
    positions = tf.ragged.range(start, tf.maximum(stop, start)).flat_values
    flat = tf.gather(items.row_splits, rows) + positions
    weight = tf.gather(records[WEIGHTS].flat_values, flat) if weighted else tf.ones_like(positions, tf.float32)
    pairs = {
        "user": tf.gather(records["user"], rows),
        "history": windows(items, positions, rows, history),
        "target": tf.gather(items.flat_values, flat),
        "weight": weight,
        "has_history": positions > 0,
    }
    return _permuted(pairs, seed)


def _permuted(pool: dict, seed) -> dict:
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(pool["target"])[0]), seed=seed)
    return {k: tf.gather(v, order) for k, v in pool.items()}


def _trained(records: dict, validation: Validation) -> tuple[tf.Tensor, tf.Tensor]:
    """int64 [records] each: the first and one past the last position a record trains on."""
    lengths = records["items"].row_lengths()
    start = records["start"]
    held = tf.where(validation.users(records["user"], records["last"], lengths - start), validation.holdout, 0)
    return start, lengths - tf.cast(held, tf.int64)


def _chunks(records: dict, history: int, chunk: int, validation: Validation, weighted: bool, seed) -> dict:
    """Every training target of a pool of parsed records in chunks of up to `chunk` consecutive
    targets of one record, each with the `history` items before its first target, permuted.

    Returns:
        {"user": int64 [n], "sequence": int64 [n, history + chunk], and [n, chunk] each:
        "target" (0 where none), "weight" (0 where none), "has_history", "valid"}.
    """
    items = records["items"]
    start, stop = _trained(records, validation)
    n_chunks = (tf.maximum(stop - start, 0) + chunk - 1) // chunk
    rows = tf.repeat(tf.range(tf.shape(start, out_type=tf.int64)[0]), n_chunks)
    first = tf.gather(start, rows) + tf.ragged.range(n_chunks).flat_values * chunk
    positions = first[:, None] + tf.range(-history, chunk, dtype=tf.int64)[None, :]
    inside = (positions >= 0) & (positions < tf.gather(stop, rows)[:, None])  # nothing held out is read
    flat = tf.gather(items.row_splits, rows)[:, None] + tf.where(inside, positions, 0)
    sequence = tf.where(inside, tf.gather(items.flat_values, flat), tf.constant(-1, tf.int64))
    valid = inside[:, history:]
    if weighted:
        weight = tf.where(valid, tf.gather(records[WEIGHTS].flat_values, flat[:, history:]), 0.0)
    else:
        weight = tf.cast(valid, tf.float32)
    chunks = {
        "user": tf.gather(records["user"], rows),
        "sequence": sequence,
        "target": tf.where(valid, sequence[:, history:], tf.constant(0, tf.int64)),
        "weight": weight,
        "has_history": valid & (positions[:, history:] > 0),
        "valid": valid,
    }
    return _permuted(chunks, seed)


def training_pairs(
    pattern: str,
    *,
    history: int,
    batch_size: int,
    pool_pairs: int,
    mean_pairs: float,
    seed: int,
    epoch: int,
    weighted: bool,
    validation: Validation,
    with_history: bool = True,
    chunk: int = 1,
) -> tf.data.Dataset:
    """Shuffled batches of training pairs for one epoch (see the module docstring).

    Args:
        pattern: the train split's shards.
        history: H, the history window.
        batch_size: pairs per batch (the last batch of a pool may be smaller).
        pool_pairs: about how many pairs are permuted together (`training.shuffle_buffer`);
            lowered so that a pool's history matrix stays under `MAX_POOL_ENTRIES`.
        mean_pairs: training pairs per record, to turn `pool_pairs` into records.
        seed, epoch: the shuffle is a function of both: the same run reshuffles every epoch the
            same way.
        weighted: the records have `weights`.
        validation: whose last targets to leave out.
        with_history: build each pair's history window; False gives `history` int64 [batch, 0]
            (a model that reads no history, e.g. two_tower, then costs no window gathers).
            The pools, and so the order of the pairs, are the same either way.
        chunk: > 1: chunk batches of `batch_size // chunk` chunks of up to `chunk` consecutive
            targets of one record (with a history: `with_history` is then implied).

    Returns:
        A dataset of pair (or chunk) batches (shapes in the module docstring).
    """
    pool_pairs = max(batch_size, min(pool_pairs, MAX_POOL_ENTRIES // max(history, 1)))
    pool_records = max(1, int(pool_pairs / max(mean_pairs, 1.0)))
    records = read_records(record_files(pattern), shuffle=True, seed=seed + epoch)
    records = records.shuffle(4 * pool_records, seed=seed + epoch, reshuffle_each_iteration=False)
    pools = records.batch(pool_records).map(lambda s: _parse(s, weighted), num_parallel_calls=tf.data.AUTOTUNE)

    def cut(i, r):
        pool_seed = tf.stack([tf.cast(seed + epoch, tf.int64), i])
        if chunk > 1:
            return _chunks(r, history, chunk, validation, weighted, pool_seed)
        return _pairs(r, history if with_history else 0, validation, weighted, pool_seed)

    pools = pools.enumerate().map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if chunk <= 1:
        return pools.flat_map(lambda p: _batches(p, batch_size)).prefetch(2)
    batches = pools.flat_map(lambda p: _batches(p, max(1, batch_size // chunk)))
    return batches.map(_flat_chunks, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def _flat_chunks(batch: dict) -> dict:
    """A batch of chunks with its per-target fields [C, chunk] flattened to [C * chunk] and the
    chunk's user repeated for each of its targets."""
    chunk = tf.shape(batch["target"])[1]
    flat = {k: tf.reshape(v, [-1]) for k, v in batch.items() if k not in ("user", "sequence")}
    return {**flat, "user": tf.repeat(batch["user"], chunk), "sequence": batch["sequence"]}


# What a padding pair holds (`valid` False): it weighs nothing and is no one's negative.
_PADDING = {"user": 0, "history": -1, "sequence": -1, "target": 0, "weight": 0.0, "has_history": False, "valid": False}


def _batches(pool: dict, batch_size: int) -> tf.data.Dataset:
    """A permuted pool cut into batches in the graph: one dataset element per batch, not per pair.
    Every batch has `batch_size` pairs (or chunks; one shape, so the step compiles once); the
    last one of a pool is filled up with padding (`valid` False)."""
    n = tf.shape(pool["target"])[0]
    fill = (batch_size - n % batch_size) % batch_size
    pool = {"valid": tf.ones([n], tf.bool), **pool}  # chunks bring their own

    def padded(key, v):
        shape = tf.concat([[fill], tf.shape(v)[1:]], 0)
        return tf.reshape(
            tf.concat([v, tf.fill(shape, tf.constant(_PADDING[key], v.dtype))], 0),
            tf.concat([[-1, batch_size], tf.shape(v)[1:]], 0),
        )

    return tf.data.Dataset.from_tensor_slices({k: padded(k, v) for k, v in pool.items()})


PARSE_RECORDS = 4096  # records parsed (and filtered) at once before they are cut into blocks


def _selected_users(pattern: str, select, block_users: int) -> tf.data.Dataset:
    """Records of the split, parsed in bulk, kept where `select(records)` ([n] bool) holds, then
    batched `block_users` at a time."""

    def keep(serialized):
        records = _parse(serialized, weighted=False)
        mask = select(records)
        return {
            k: tf.ragged.boolean_mask(v, mask) if isinstance(v, tf.RaggedTensor) else v[mask]
            for k, v in records.items()
        }

    records = read_records(record_files(pattern), shuffle=False, seed=0).batch(PARSE_RECORDS)
    records = records.map(keep, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return records.batch(block_users)


def newest(items: tf.RaggedTensor, history: int) -> tf.Tensor:
    """int64 [records, H]: the last `history` items of each record, right-aligned (`windows` at
    each record's end)."""
    lengths = items.row_lengths()
    return windows(items, lengths, tf.range(tf.shape(lengths, out_type=tf.int64)[0]), history)


def _block(items: tf.RaggedTensor, user: tf.Tensor, targets: tf.RaggedTensor, history: int) -> dict:
    return {"user": user, "history": newest(items, history), "seen": items, "targets": targets}


def eval_blocks(pattern: str, *, history: int, block_users: int, share: float = 1.0) -> tf.data.Dataset:
    """Blocks of eval users (their held-out `targets`), `share` of them by a deterministic sample.

    Returns:
        A dataset of blocks (shapes in the module docstring).
    """
    if share >= 1:  # every user: no filtering, so no unbatching
        records = read_records(record_files(pattern), shuffle=False, seed=0).batch(block_users)
        records = records.map(lambda s: _parse(s, weighted=False), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        records = _selected_users(pattern, lambda r: sampled(r["user"], share, salt=2), block_users)
    blocks = records.map(
        lambda r: _block(r["items"], r["user"], r["targets"], history), num_parallel_calls=tf.data.AUTOTUNE
    )
    return blocks.prefetch(2)


def validation_blocks(pattern: str, *, history: int, block_users: int, validation: Validation) -> tf.data.Dataset:
    """Blocks of validation users: their last `validation.holdout` training targets held out.

    Returns:
        A dataset of blocks (shapes in the module docstring).
    """
    holdout = validation.holdout

    def select(records):
        return validation.users(records["user"], records["last"], records["items"].row_lengths() - records["start"])

    def block(records):
        items = records["items"]
        return _block(items[:, :-holdout], records["user"], items[:, -holdout:], history)

    records = _selected_users(pattern, select, block_users)
    return records.map(block, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def user_histories(train_pattern: str, eval_pattern: str, *, users: int) -> Iterator[dict]:
    """Every user's full history, training items then held-out ones, oldest first, in blocks.

    A user with an eval record gets its items (the newest `MAX_RECORD_ITEMS` training items of
    `pipeline.collaborative`) followed by its held-out targets; a user without one (no more
    interactions than the holdout) gets its last train record's items.

    Args:
        train_pattern, eval_pattern: the splits' shards.
        users: rows of the user table (every record's `user` is below it).

    Yields:
        {"user": int64 [b], "items": int64 ragged [b, (n)]}; OOV user rows may repeat.
    """
    evaluated = np.zeros(users, bool)
    for records in _parsed(eval_pattern):
        evaluated[records["user"].numpy()] = True
        yield {"user": records["user"], "items": tf.concat([records["items"], records["targets"]], axis=1)}
    for records in _parsed(train_pattern):
        user = records["user"].numpy()
        keep = (records["last"].numpy() == 1) & ~evaluated[user]
        yield {"user": records["user"][keep], "items": tf.ragged.boolean_mask(records["items"], keep)}


def _parsed(pattern: str) -> Iterator[dict]:
    records = read_records(record_files(pattern), shuffle=False, seed=0).batch(PARSE_RECORDS)
    yield from records.map(lambda s: _parse(s, weighted=False), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)

"""The collaborative preprocessing job: interaction logs -> one sequence record per user and split,
a temporal holdout, user and item vocabularies (tf.Transform), and TFRecords for retrieval.

    ReadRawLogs | ParseAndValidate | KeyByUserBucket | GroupByKey | UserSequences
        | TransformAndWrite                                             (+ WriteDeadLetters)

Records (`schemas.features`; one schema for both splits, ids are rows of the `user` and `item`
tables after the transform):

* train: a user's training interactions, oldest first, as one record (`items`, with `weights`
  when configured): storage grows with the interactions, not with interactions x history; the
  trainer cuts (history window -> target) pairs out of it. A history longer than
  `MAX_RECORD_ITEMS` is cut deterministically into chunks of that many targets, each preceded by
  the `max_history` items before it as context (`start` says where the targets begin), so no
  record grows without bound and no interaction is lost;
* eval: one record per user with a holdout: `targets` are the user's last `holdout`
  interactions, `items` the training interactions before them (the newest `MAX_RECORD_ITEMS`),
  the history and the items to exclude from the ranking.

The holdout is cut per user by timestamp (ties broken by item, then weight), so evaluation
never sees the future. Users with `holdout` interactions or fewer stay wholly in training. The
item vocabulary is learned from the training interactions only; the user vocabulary counts each
user's training interactions.

All the work is on Arrow batches and numpy arrays, never one Python object per interaction:
`KeyByUserBucket` hashes each batch's users into `USER_BUCKETS` buckets and sends each bucket's
slice of the batch on as one element (`pack`ed: compressed, since a distributed runner's shuffle
moves these bytes and the local runner holds a GroupByKey's whole input in memory), the GroupByKey brings every interaction of a user into one
bucket (so a distributed runner spreads the work over buckets of users), and `UserSequences`
sorts a bucket's interactions and cuts and builds its records with vectorised array operations.
"""

from __future__ import annotations

import functools
import logging

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.metrics import Metrics
from tfx_bsl.public import tfxio

from pipeline import transforms
from pipeline.preprocessing import unit_weights
from pipeline.transforms import (
    COUNTS,
    DEAD,
    EVAL,
    NAMESPACE,
    TRAIN,
    ParseAndValidate,
    ReadRawLogs,
    TransformAndWrite,
    WriteDeadLetters,
    WriteRowCounts,
    input_counts,
)
from schemas import layout
from schemas.config import CollaborativeConfig, VocabularySide
from schemas.features import LIST_FEATURES, MAX_RECORD_ITEMS, WEIGHTS, sequence_feature_spec
from schemas.progress import Progress

# Buckets of users the GroupByKey groups by: each batch is split into at most this many
# elements, and a runner can spread the buckets over this many workers.
USER_BUCKETS = 256
# Items per record batch handed to tf.Transform: its vocabulary counts each batch's distinct
# items in the graph and sends those to Beam, so fewer, larger batches send far fewer elements.
TRANSFORM_BATCH_ITEMS = 1 << 20

# The shuffle's encoding (`pack`); its size and cost are measured in docs/performance.md.
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")

_LOG = logging.getLogger(__name__)


def record_arrow_schema(weighted: bool) -> pa.Schema:
    """The Arrow layout of the records `UserSequences` builds (`sequence_feature_spec`)."""
    text, ints = pa.large_list(pa.large_binary()), pa.large_list(pa.int64())
    fields = [("user", text), ("start", ints), ("last", ints)] + [(n, text) for n in LIST_FEATURES]
    if weighted:
        fields.append((WEIGHTS, pa.large_list(pa.float32())))
    return pa.schema(fields)


def tensor_adapter_config(weighted: bool) -> tfxio.TensorAdapterConfig:
    """How tf.Transform turns `record_arrow_schema` batches into `sequence_feature_spec` tensors."""
    return transforms.tensor_adapter_config(sequence_feature_spec(weighted), record_arrow_schema(weighted))


def make_preprocessing_fn(config: CollaborativeConfig):
    """User rows, and item rows for `items`/`targets` from one item vocabulary (named `item`).

    The item vocabulary counts the training targets (not a chunk's context items); the user
    vocabulary weighs each user by their training targets, so both count interactions.
    """
    user, item, weighted = config.user, config.item, config.weight is not None

    def preprocessing_fn(inputs: dict) -> dict:
        items, start = inputs["items"], inputs["start"]
        rows = items.indices[:, 0]
        is_target = items.indices[:, 1] >= tf.gather(start, rows)
        targets = tf.boolean_mask(items.values, is_target)
        item_vocab = tft.vocabulary(targets, vocab_filename=item.name, weights=unit_weights(targets), **_limits(item))
        per_user = tf.math.unsorted_segment_sum(tf.cast(is_target, tf.float32), rows, tf.shape(start)[0])
        user_vocab = tft.vocabulary(inputs["user"], vocab_filename=user.name, weights=per_user, **_limits(user))
        outputs = {
            "user": tft.apply_vocabulary(inputs["user"], user_vocab, num_oov_buckets=user.oov_buckets),
            "start": start,
            "last": inputs["last"],
        }
        for name in LIST_FEATURES:
            outputs[name] = tft.apply_vocabulary(inputs[name], item_vocab, num_oov_buckets=item.oov_buckets)
        if weighted:
            outputs[WEIGHTS] = inputs[WEIGHTS]
        return outputs

    return preprocessing_fn


def _limits(side: VocabularySide) -> dict:
    return {"top_k": side.top_k, "frequency_threshold": side.min_count if side.min_count > 1 else None}


# -- keying -----------------------------------------------------------------------------------


def interactions_of(batch: pa.RecordBatch, config: CollaborativeConfig) -> pa.Table:
    """A canonical batch as an interactions table: `user` and `item` (strings), `ts`, and with
    `interactions.weight` a float32 `weight` (none without: every interaction weighs 1)."""

    def column(name):
        return pc.list_flatten(batch.column(name))

    columns = {
        "user": pc.cast(column(config.user.column), pa.string()),
        "item": pc.cast(column(config.item.column), pa.string()),
        "ts": column(config.timestamp),
    }
    if config.weight:
        columns["weight"] = pc.cast(column(config.weight), pa.float32())
    return pa.table(columns)


def pack(table: pa.Table) -> bytes:
    """An interactions table as the bytes `KeyByUserBucket` shuffles: an Arrow IPC stream, zstd."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_IPC_OPTIONS) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack(data: bytes) -> pa.Table:
    """The table `pack` wrote."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def user_buckets(users: pa.Array, buckets: int = USER_BUCKETS) -> np.ndarray:
    """The bucket of each user: a FarmHash fingerprint, so the same on every worker and run."""
    return tf.strings.to_hash_bucket_fast(users.to_numpy(zero_copy_only=False).astype(object), buckets).numpy()


class KeyByUserBucket(beam.PTransform):
    """Canonical batches -> (user bucket, the interactions of that bucket's users in the batch,
    `pack`ed)."""

    def __init__(self, config: CollaborativeConfig, buckets: int = USER_BUCKETS):
        super().__init__()
        self.config = config
        self.buckets = buckets

    def expand(self, batches):
        return batches | "Bucket" >> beam.FlatMap(
            _by_bucket, config=self.config, buckets=self.buckets
        ).with_output_types(tuple[int, bytes])


def _by_bucket(batch: pa.RecordBatch, config: CollaborativeConfig, buckets: int):
    table = interactions_of(batch, config)
    bucket = user_buckets(table.column("user"), buckets)
    order = np.argsort(bucket, kind="stable")
    sorted_buckets = bucket[order]
    edges = np.flatnonzero(np.diff(sorted_buckets)) + 1
    for part in np.split(order, edges):
        if part.size:
            yield int(bucket[part[0]]), pack(table.take(pa.array(part)))


# -- records ----------------------------------------------------------------------------------


def sequence_records(
    interactions: pa.Table, holdout: int, max_history: int, weighted: bool, max_items: int = MAX_RECORD_ITEMS
) -> tuple[pa.RecordBatch, pa.RecordBatch, dict[str, int]]:
    """Every user's train and eval records from their interactions (see the module docstring).

    Args:
        interactions: `interactions_of` tables' rows, all interactions of the users they hold.
        holdout: interactions per user held out for evaluation (by time).
        max_history: context items before a chunk of a long training sequence.
        weighted: give the records a `weights` list.
        max_items: the most targets a train record holds (and training items an eval record keeps).

    Returns:
        (train records, eval records, counts): record batches in `record_arrow_schema(weighted)`,
        and {"train": training interactions, "eval": held-out interactions, "users_evaluated"}.
    """
    table = interactions.combine_chunks()
    keys = ("user", "ts", "item", "weight") if weighted else ("user", "ts", "item")
    order = pc.sort_indices(table, sort_keys=[(c, "ascending") for c in keys])
    table = table.take(order)
    n = table.num_rows
    users = table.column("user").combine_chunks()
    if n == 0:
        empty = pa.RecordBatch.from_pylist([], schema=record_arrow_schema(weighted))
        return empty, empty, {"train": 0, "eval": 0, "users_evaluated": 0}
    change = np.flatnonzero(pc.not_equal(users.slice(1), users.slice(0, n - 1)).to_numpy(zero_copy_only=False)) + 1
    begin = np.concatenate([[0], change]).astype(np.int64)
    end = np.concatenate([change, [n]]).astype(np.int64)
    count = end - begin
    cut = np.where(count > holdout, count - holdout, count)  # training interactions per user
    train_end = begin + cut

    # train: chunks of at most max_items targets, each after up to max_history items of context
    chunks = -(-cut // max_items)
    owner = np.repeat(np.arange(len(begin)), chunks)
    index = np.arange(len(owner)) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    target_begin = begin[owner] + index * max_items
    target_end = np.minimum(target_begin + max_items, train_end[owner])
    context_begin = np.maximum(begin[owner], target_begin - max_history)
    train = _records(
        table,
        owner_rows=begin[owner],
        item_ranges=(context_begin, target_end),
        target_ranges=None,
        start=target_begin - context_begin,
        last=(target_end == train_end[owner]).astype(np.int64),
        weighted=weighted,
    )
    # eval: users with more than `holdout` interactions
    held = np.flatnonzero(count > holdout)
    seen_end = train_end[held]
    seen_begin = np.maximum(begin[held], seen_end - max_items)
    evaluation = _records(
        table,
        owner_rows=begin[held],
        item_ranges=(seen_begin, seen_end),
        target_ranges=(seen_end, end[held]),
        start=seen_end - seen_begin,
        last=np.ones(len(held), np.int64),
        weighted=weighted,
    )
    counts = {"train": int(cut.sum()), "eval": int((count[held] - cut[held]).sum()), "users_evaluated": len(held)}
    return train, evaluation, counts


def _ranges(begin: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [len(begin) + 1], indices): the concatenation of every range begin[i]:end[i]."""
    lengths = end - begin
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.repeat(begin - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return offsets, indices


def _lists(values: pa.Array, begin: np.ndarray, end: np.ndarray) -> pa.Array:
    offsets, indices = _ranges(begin, end)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values.take(pa.array(indices)))


def _one_each(values: pa.Array) -> pa.Array:
    return pa.LargeListArray.from_arrays(pa.array(np.arange(len(values) + 1, dtype=np.int64)), values)


def _records(table: pa.Table, owner_rows, item_ranges, target_ranges, start, last, weighted: bool) -> pa.RecordBatch:
    """One record per range: the owner's user, the items (and weights) of `item_ranges`, the
    targets of `target_ranges` (empty lists without), `start` and `last`."""
    items = pc.cast(table.column("item").combine_chunks(), pa.large_binary())
    columns = {
        "user": _one_each(pc.cast(table.column("user").combine_chunks(), pa.large_binary()).take(pa.array(owner_rows))),
        "start": _one_each(pa.array(start.astype(np.int64))),
        "last": _one_each(pa.array(last)),
        "items": _lists(items, *item_ranges),
        "targets": _lists(items, *(target_ranges or (item_ranges[0], item_ranges[0]))),
    }
    if weighted:
        columns[WEIGHTS] = _lists(table.column("weight").combine_chunks(), *item_ranges)
    return pa.RecordBatch.from_arrays(list(columns.values()), schema=record_arrow_schema(weighted))


class UserSequences(beam.PTransform):
    """(bucket, `pack`ed interactions tables) groups -> `TRAIN` and `EVAL` record batches
    (`sequence_records`), regrouped into batches of about `TRANSFORM_BATCH_ITEMS` items for
    tf.Transform, and under `COUNTS` the (name, count) pairs of the interactions in each split and
    the users evaluated."""

    def __init__(self, config: CollaborativeConfig):
        super().__init__()
        self.config = config

    def expand(self, grouped):
        records = grouped | "Records" >> beam.ParDo(_UserSequences(self.config)).with_outputs(TRAIN, EVAL, COUNTS)
        out = {tag: records[tag] | f"Rebatch{tag.title()}" >> _Rebatch() for tag in (TRAIN, EVAL)}
        return {**out, COUNTS: records[COUNTS]}


class _Rebatch(beam.PTransform):
    def expand(self, batches):
        return (
            batches
            | "Group"
            >> beam.BatchElements(
                min_batch_size=TRANSFORM_BATCH_ITEMS, max_batch_size=TRANSFORM_BATCH_ITEMS, element_size_fn=_items_in
            )
            | "Concat" >> beam.Map(_concat)
        )


def _items_in(batch: pa.RecordBatch) -> int:
    return max(1, len(pc.list_flatten(batch.column("items"))))


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0] if len(batches) > 1 else batches[0]


class _UserSequences(beam.DoFn):
    def __init__(self, config: CollaborativeConfig):
        self.holdout = config.holdout
        self.max_history = config.max_history
        self.weighted = config.weight is not None
        self.counters = {t: Metrics.counter(NAMESPACE, f"rows_{t}") for t in (TRAIN, EVAL)}
        self.users_evaluated = Metrics.counter(NAMESPACE, "users_evaluated")

    def setup(self):
        self._progress = Progress(_LOG, "preprocess: user sequences (this worker)", unit="interactions")

    def process(self, element):
        _, packed = element
        train, evaluation, counts = sequence_records(
            pa.concat_tables([unpack(data) for data in packed]), self.holdout, self.max_history, self.weighted
        )
        self.counters[TRAIN].inc(counts["train"])
        self.counters[EVAL].inc(counts["eval"])
        self.users_evaluated.inc(counts["users_evaluated"])
        for name in ("train", "eval", "users_evaluated"):
            yield beam.pvalue.TaggedOutput(COUNTS, (name, counts[name]))
        self._progress.add(counts["train"] + counts["eval"])
        if train.num_rows:
            yield beam.pvalue.TaggedOutput(TRAIN, train)
        if evaluation.num_rows:
            yield beam.pvalue.TaggedOutput(EVAL, evaluation)


# -- counting ---------------------------------------------------------------------------------


def count_sequence_ids(batch: pa.RecordBatch, user_table: str, item_table: str) -> transforms.IdCounts:
    """{table: (rows, occurrences)} of a transformed train batch: each target item once, each
    user once per target (context items of a chunk are not counted)."""
    items = batch.column("items")
    lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(items).to_numpy(zero_copy_only=False)
    start = pc.list_flatten(batch.column("start")).to_numpy(zero_copy_only=False)
    user = pc.list_flatten(batch.column("user")).to_numpy(zero_copy_only=False)
    position = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    targets = values[position >= np.repeat(start, lengths)]
    per_user = np.maximum(lengths - start, 0)
    return {
        item_table: transforms.unique_counts(targets),
        user_table: transforms.unique_counts(user, per_user.astype(np.float64)),
    }


def build_pipeline(p: beam.Pipeline, config: CollaborativeConfig, output_dir: str, temp_dir: str) -> None:
    """Adds the whole collaborative job to `p`, writing into the run `output_dir`."""
    weighted = config.weight is not None
    with tft_beam.Context(temp_dir=temp_dir):
        read = p | "ReadRawLogs" >> ReadRawLogs(config)
        validated = read.rows | "ParseAndValidate" >> ParseAndValidate(config)
        records = (
            validated.rows
            | "KeyByUserBucket" >> KeyByUserBucket(config)
            | "GroupByUser" >> beam.GroupByKey()
            | "UserSequences" >> UserSequences(config)
        )
        count_ids = functools.partial(count_sequence_ids, user_table=config.user.name, item_table=config.item.name)
        counts = records.pop(COUNTS)
        _ = records | "TransformAndWrite" >> TransformAndWrite(
            make_preprocessing_fn(config), tensor_adapter_config(weighted), output_dir, count_ids
        )
        _ = (read[DEAD], validated[DEAD]) | "WriteDeadLetters" >> WriteDeadLetters(
            layout.dead_letter_prefix(output_dir)
        )
        _ = (*input_counts(read, validated), counts) | "WriteRowCounts" >> WriteRowCounts(
            layout.row_counts_path(output_dir)
        )

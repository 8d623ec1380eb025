"""The collaborative preprocessing job: interaction logs -> per-user histories, a temporal holdout,
user and item vocabularies (tf.Transform), and TFRecords for retrieval training.

    ReadRawLogs | ParseAndValidate | KeyByUser | GroupByKey | TemporalHoldout
        | ToRecordBatches | TransformAndWrite

Examples (one schema for both splits; ids are rows of the `user` and `item` tables):

* train: one per training interaction: `user`, `history` (the user's previous `max_history`
  items, oldest first; empty for the first), `targets` (the item), `seen` (empty), `weight`;
* eval: one per user with a holdout: `history` (the last `max_history` training items),
  `targets` (the last `holdout` items, by time), `seen` (every training item, to exclude from
  the ranking), `weight` 1.

The holdout is computed in Beam per user, by timestamp (ties broken by item), so evaluation
never sees the future. Users with `holdout` interactions or fewer stay wholly in training.
The item vocabulary is learned from the training interactions only.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.metrics import Metrics
from tfx_bsl.public import tfxio

from pipeline import transforms
from pipeline.transforms import (
    DEAD,
    EVAL,
    NAMESPACE,
    TRAIN,
    ParseAndValidate,
    ReadRawLogs,
    TransformAndWrite,
    WriteDeadLetters,
)
from schemas import layout
from schemas.config import CollaborativeConfig, VocabularySide
from schemas.features import LIST_FEATURES, interaction_feature_spec

EXAMPLE_BATCH = 4096


def example_arrow_schema() -> pa.Schema:
    """The Arrow layout of the examples `TemporalHoldout` emits (`interaction_feature_spec`)."""
    text = pa.large_list(pa.large_binary())
    return pa.schema([("user", text), ("weight", pa.large_list(pa.float32()))] + [(n, text) for n in LIST_FEATURES])


def tensor_adapter_config() -> tfxio.TensorAdapterConfig:
    """How tf.Transform turns `example_arrow_schema` batches into `interaction_feature_spec` tensors."""
    return transforms.tensor_adapter_config(interaction_feature_spec(), example_arrow_schema())


def make_preprocessing_fn(config: CollaborativeConfig):
    """User ids, and item ids for history/targets/seen from one item vocabulary (named `item`)."""
    user, item = config.user, config.item

    def preprocessing_fn(inputs: dict) -> dict:
        item_vocab = tft.vocabulary(inputs["targets"], vocab_filename=item.name, **_limits(item))
        outputs = {
            "user": tft.compute_and_apply_vocabulary(
                inputs["user"], num_oov_buckets=user.oov_buckets, vocab_filename=user.name, **_limits(user)
            ),
            "weight": inputs["weight"],
        }
        for name in LIST_FEATURES:
            outputs[name] = tft.apply_vocabulary(inputs[name], item_vocab, num_oov_buckets=item.oov_buckets)
        return outputs

    return preprocessing_fn


def _limits(side: VocabularySide) -> dict:
    return {"top_k": side.top_k, "frequency_threshold": side.min_count if side.min_count > 1 else None}


class KeyByUser(beam.PTransform):
    """Canonical batches -> (user, (timestamp, item, weight)) per interaction."""

    def __init__(self, config: CollaborativeConfig):
        super().__init__()
        self.config = config

    def expand(self, batches):
        return batches | "Explode" >> beam.FlatMap(_key_by_user, config=self.config)


def _key_by_user(batch: pa.RecordBatch, config: CollaborativeConfig):
    def column(name):
        return pc.list_flatten(batch.column(name))

    users = pc.cast(column(config.user.column), pa.string()).to_pylist()
    items = pc.cast(column(config.item.column), pa.string()).to_pylist()
    times = column(config.timestamp).to_numpy(zero_copy_only=False).tolist()
    if config.weight:
        weights = column(config.weight).to_numpy(zero_copy_only=False).astype(np.float32).tolist()
    else:
        weights = [1.0] * batch.num_rows
    return zip(users, zip(times, items, weights))


class TemporalHoldout(beam.PTransform):
    """(user, interactions) groups -> `TRAIN` and `EVAL` example dicts (see module docstring)."""

    def __init__(self, config: CollaborativeConfig):
        super().__init__()
        self.config = config

    def expand(self, grouped):
        return grouped | "Holdout" >> beam.ParDo(_Holdout(self.config)).with_outputs(TRAIN, EVAL)


class _Holdout(beam.DoFn):
    def __init__(self, config: CollaborativeConfig):
        self.holdout = config.holdout
        self.max_history = config.max_history
        self.counters = {t: Metrics.counter(NAMESPACE, f"rows_{t}") for t in (TRAIN, EVAL)}
        self.users_evaluated = Metrics.counter(NAMESPACE, "users_evaluated")

    def process(self, element):
        user, events = element
        events = sorted(events)
        cut = len(events) - self.holdout if len(events) > self.holdout else len(events)
        history = [item for _, item, _ in events[:cut]]
        for i, (_, item, weight) in enumerate(events[:cut]):
            start = max(0, i - self.max_history)
            yield beam.pvalue.TaggedOutput(
                TRAIN, {"user": [user], "history": history[start:i], "targets": [item], "seen": [], "weight": [weight]}
            )
        self.counters[TRAIN].inc(cut)
        held = [item for _, item, _ in events[cut:]]
        if held:
            self.counters[EVAL].inc(len(held))
            self.users_evaluated.inc()
            yield beam.pvalue.TaggedOutput(
                EVAL,
                {
                    "user": [user],
                    "history": history[-self.max_history :],
                    "targets": held,
                    "seen": sorted(set(history)),
                    "weight": [1.0],
                },
            )


class ToRecordBatches(beam.PTransform):
    """Example dicts -> RecordBatches in `example_arrow_schema()`, for tf.Transform."""

    def expand(self, examples):
        return (
            examples
            | "Batch" >> beam.BatchElements(min_batch_size=256, max_batch_size=EXAMPLE_BATCH)
            | "ToArrow" >> beam.Map(lambda rows: pa.RecordBatch.from_pylist(rows, schema=example_arrow_schema()))
        )


def build_pipeline(p: beam.Pipeline, config: CollaborativeConfig, output_dir: str, temp_dir: str) -> None:
    """Adds the whole collaborative job to `p`, writing into the run `output_dir`."""
    with tft_beam.Context(temp_dir=temp_dir):
        read = p | "ReadRawLogs" >> ReadRawLogs(config)
        validated = read.rows | "ParseAndValidate" >> ParseAndValidate(config)
        split = (
            validated.rows
            | "KeyByUser" >> KeyByUser(config)
            | "GroupByUser" >> beam.GroupByKey()
            | "TemporalHoldout" >> TemporalHoldout(config)
        )
        batches = {tag: split[tag] | f"{tag.title()}ToArrow" >> ToRecordBatches() for tag in (TRAIN, EVAL)}
        id_columns = {config.user.name: "user", config.item.name: "targets"}
        _ = batches | "TransformAndWrite" >> TransformAndWrite(
            make_preprocessing_fn(config), tensor_adapter_config(), output_dir, id_columns
        )
        _ = (read[DEAD], validated[DEAD]) | "WriteDeadLetters" >> WriteDeadLetters(
            layout.dead_letter_prefix(output_dir)
        )

"""The Beam stages on the tiny fixture, with TestPipeline + assert_that."""

import dataclasses
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline import rows
from pipeline.preprocess import LOCAL_RUNNER
from pipeline.transforms import (
    DEAD,
    EVAL,
    TRAIN,
    ParseAndValidate,
    ReadRawLogs,
    SplitTrainEval,
    count_column_ids,
    counts_json,
    merge_counts,
)


def test_read_validate_split_accounts_for_every_line(tiny_config):
    with TestPipeline(runner=LOCAL_RUNNER) as p:
        read = p | ReadRawLogs(tiny_config)
        valid = read.rows | ParseAndValidate(tiny_config)
        split = valid.rows | SplitTrainEval(tiny_config)
        dead = (read[DEAD], valid[DEAD]) | "AllDead" >> beam.Flatten()

        sizes = {
            tag: pcoll | f"Rows{tag}" >> beam.Map(lambda b: b.num_rows) | f"Sum{tag}" >> beam.CombineGlobally(sum)
            for tag, pcoll in ((TRAIN, split[TRAIN]), (EVAL, split[EVAL]))
        }
        total = (sizes[TRAIN], sizes[EVAL]) | "Both" >> beam.Flatten() | "Total" >> beam.CombineGlobally(sum)
        assert_that(total, equal_to([240]), label="GoodRows")
        reasons = dead | beam.Map(lambda d: d.reason)
        assert_that(
            reasons,
            equal_to([rows.MALFORMED_CSV, rows.BAD_FLOAT, rows.EMPTY_LINE, rows.MISSING_VALUE]),
            label="DeadLetterReasons",
        )
        eval_days = split[EVAL] | beam.FlatMap(lambda b: b.column("day").flatten().to_pylist())
        assert_that(
            eval_days | beam.combiners.Count.Globally() | beam.Map(lambda n: 30 <= n <= 90),
            equal_to([True]),
            label="EvalShare",
        )


def test_id_counts_merge_across_batches():
    def batch(ids):
        return pa.RecordBatch.from_pydict({"t": pa.array([[i] for i in ids], pa.large_list(pa.int64()))}), {}

    with TestPipeline(runner=LOCAL_RUNNER) as p:
        counts = (
            p
            | beam.Create([batch([0, 1, 1]), batch([1, 2]), batch([0])])
            | beam.Map(lambda element: count_column_ids(element[0], columns={"t": "t"}))
            | beam.CombineGlobally(merge_counts)
            | beam.Map(lambda merged: json.loads(counts_json(merged)))
        )
        assert_that(counts, equal_to([{"t": {"0": 2, "1": 3, "2": 1}}]))


def test_parquet_rows_keep_their_file_and_row_number(tiny_config, tmp_path):
    n = 120
    carriers = ["AA" if i % 37 else None for i in range(n)]  # rows 1, 38, 75, 112 miss their carrier
    table = pa.table(
        {
            "delay": [float(i) for i in range(n)],
            "carrier": carriers,
            "tail": ["N1"] * n,
            "day": ["Mon"] * n,
            "hour": list(range(n)),
            "distance": [1.0] * n,
        }
    )
    paths = [str(tmp_path / f"part-{k}.parquet") for k in range(2)]
    for path in paths:
        pq.write_table(table, path, row_group_size=50)  # three row groups a file
    parquet = dataclasses.replace(tiny_config.input, format="parquet", path=str(tmp_path / "part-*.parquet"))
    config = dataclasses.replace(tiny_config, input=parquet)
    with TestPipeline(runner=LOCAL_RUNNER) as p:
        read = p | ReadRawLogs(config)
        valid = read.rows | ParseAndValidate(config)
        good = valid.rows | beam.Map(lambda b: b.num_rows) | beam.CombineGlobally(sum)
        assert_that(good, equal_to([2 * (n - 4)]), label="GoodRows")
        where = valid[DEAD] | beam.Map(lambda d: (d.source, d.line, d.reason, d.row["delay"]))
        expected = [(path, i + 1, rows.MISSING_VALUE, float(i)) for path in paths for i in range(0, n, 37)]
        assert_that(where, equal_to(expected), label="DeadLetters")

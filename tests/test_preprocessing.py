"""The preprocessing_fn on four rows: exact outputs and golden vocabularies (tf.Transform's own
`assertAnalyzeAndTransformResults`)."""

import apache_beam as beam
import tensorflow as tf
from tensorflow_transform.beam import tft_unit

from pipeline import rows
from pipeline.preprocess import LOCAL_RUNNER, tensor_adapter_config
from pipeline.preprocessing import LABEL_KEY, make_preprocessing_fn
from schemas.loading import load_config

from support import edited

CONFIG = """
name: four
input:
  format: csv
  path: none.csv
  columns: {y: float, c: string, h: int, d: string, x: float}
label: {column: y, task: regression}
categorical:
  c: {type: vocabulary, min_count: 2, oov_buckets: 1}
  h: {type: identity, num_buckets: 3}
  c_hashed: {type: hash, column: c, hash_buckets: 5}
crosses:
  c_x_d: {columns: [c, d], type: vocabulary}
numeric:
  x: {normalize: zscore}
"""
LINES = [b"1,a,0,Mon,1", b"2,a,1,Tue,2", b"3,b,2,Mon,3", b"4,a,7,Mon,4"]


class PreprocessingFnTest(tft_unit.TransformTestCase):
    test_session = None  # tf.test.TestCase's deprecated helper, not a test

    def test_four_rows(self):
        path = self.create_tempdir().create_file("four.yaml", CONFIG).full_path
        config = load_config(path)
        parsed, _ = rows.parse_csv_lines(LINES, config, "four")
        batch, dead = rows.validate_batch(parsed, config, "four")
        self.assertEqual(dead, [])
        hashed = tf.strings.to_hash_bucket_fast(["a", "a", "b", "a"], 5).numpy()
        z = [-1.3416408, -0.4472136, 0.4472136, 1.3416408]
        expected = [
            # c: 'b' is below min_count 2 -> the OOV row (index 1); h=7 is out of range -> row 3.
            {"c": 0, "h": 0, "c_hashed": hashed[0], "c_x_d": 0, "x": z[0], LABEL_KEY: 1.0},
            {"c": 0, "h": 1, "c_hashed": hashed[1], "c_x_d": 2, "x": z[1], LABEL_KEY: 2.0},
            {"c": 1, "h": 2, "c_hashed": hashed[2], "c_x_d": 1, "x": z[2], LABEL_KEY: 3.0},
            {"c": 0, "h": 3, "c_hashed": hashed[3], "c_x_d": 0, "x": z[3], LABEL_KEY: 4.0},
        ]
        self.assertAnalyzeAndTransformResults(
            [batch],
            tensor_adapter_config(config),
            make_preprocessing_fn(config),
            expected_data=expected,
            # Most frequent first; ties broken by the value, descending.
            expected_vocab_file_contents={"c": [b"a"], "c_x_d": [b"a x Mon", b"b x Mon", b"a x Tue"]},
            beam_pipeline=beam.Pipeline(runner=LOCAL_RUNNER),
            temp_dir=self.get_temp_dir(),
        )

    @tft_unit.named_parameters(
        # binary on a string column: the positive value is 1, anything else 0
        dict(testcase_name="binary", label="{column: c, task: binary, positive: b}", expected=[0, 0, 1, 0], vocab={}),
        # binary on a numeric column with a threshold: values at or above it are 1 (y is 1, 2, 3, 4)
        dict(
            testcase_name="threshold", label="{column: y, task: binary, threshold: 3}", expected=[0, 0, 1, 1], vocab={}
        ),
        # multiclass: the class index is the row of the `label` vocabulary (most frequent first)
        dict(
            testcase_name="multiclass",
            label="{column: c, task: multiclass}",
            expected=[0, 0, 1, 0],
            vocab={"label": [b"a", b"b"]},
        ),
    )
    def test_label_encodings(self, label, expected, vocab):
        text = edited(CONFIG, "categorical:\n", "categorical:\n  d: {type: vocabulary}\n")
        text = edited(text, "{column: y, task: regression}", label)
        text = edited(text, "  c: {type: vocabulary, min_count: 2, oov_buckets: 1}\n", "")
        text = edited(text, "  c_hashed: {type: hash, column: c, hash_buckets: 5}\n", "")
        text = edited(text, "columns: [c, d]", "columns: [h, d]")
        config = load_config(self.create_tempdir().create_file("labels.yaml", text).full_path)
        parsed, _ = rows.parse_csv_lines(LINES, config, "four")
        batch, _ = rows.validate_batch(parsed, config, "four")
        fn = make_preprocessing_fn(config)

        def only_label(inputs):
            return {LABEL_KEY: fn(inputs)[LABEL_KEY]}

        self.assertAnalyzeAndTransformResults(
            [batch],
            tensor_adapter_config(config),
            only_label,
            expected_data=[{LABEL_KEY: v} for v in expected],
            expected_vocab_file_contents=vocab or None,
            beam_pipeline=beam.Pipeline(runner=LOCAL_RUNNER),
            temp_dir=self.get_temp_dir(),
        )

"""Stage 1: the Beam/tf.Transform job that turns raw logs into TFRecords and a transform graph.

`pipeline.preprocess.preprocess(config, run_dir)` runs it (`embedpipe preprocess` is its command
line, in `embedpipe.stages`). Imports `schemas/` only, never `trainer/` or `embedpipe/`.
"""

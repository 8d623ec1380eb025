"""Stage 1: the Beam/tf.Transform job that turns raw logs into TFRecords and a transform graph.

`pipeline.preprocess.run(argv)` is the entry point; `pipeline.cli` is the `embedpipe` command.
"""

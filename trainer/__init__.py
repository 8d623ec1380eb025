"""Stages 2 and 3: Keras training of the embeddings, and the export of every embedding table.

`trainer.train.train_any(config, run_dir)` trains; `trainer.export.export(config, run_dir)` writes
the tables; `trainer.tables.load_table(path)` reads one back for downstream code. Imports
`schemas/` only: never Beam, `pipeline/` or `embedpipe/` (see the README's "Code layout").
"""

"""Stages 2 and 3: Keras training of the embeddings, and the export of every embedding table.

`trainer.train.run(argv)` trains; `trainer.export.run(argv)` writes the tables;
`trainer.tables.load_table(path)` reads one back for downstream code.
"""

"""The errors that mean bad input rather than a bug: a config, input data, a run or a table that
cannot be used as asked. The `embedpipe` command prints them as one line (exit status 2).

They live here, importing nothing, so that the command knows them without importing TensorFlow
(`schemas.layout` and `trainer.tables` do); those modules raise them and export them too.
"""


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field, e.g.::

    schemas/taxi.yaml: categorical.company.top_k: expected a positive integer, got 'ten'
    """


class InputError(ValueError):
    """Input data that cannot be used (as opposed to single bad rows, which are dead-lettered)."""


class RunError(RuntimeError):
    """A run that cannot be started, published or read as asked."""


class TableError(ValueError):
    """An exported table that is incomplete, corrupted or inconsistent with its manifest, or a
    question the table cannot answer (`trainer.tables.UnknownKeyError`)."""


USER_ERRORS = (ConfigError, InputError, RunError, TableError, FileNotFoundError)

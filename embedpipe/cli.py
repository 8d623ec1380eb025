"""The `embedpipe` command: parses the flags, then runs the command, importing it only then.

    embedpipe run                                   # the bundled flights sample, DirectRunner
    embedpipe COMMAND --help                        # the command's flags, at once

The commands are `embedpipe.stages` (run, preprocess, train, export, publish) and
`embedpipe.commands` (example-data, neighbors, recommend, clusters, report). Their modules import
TensorFlow and Beam, which takes seconds, so they are imported here only once the flags parsed:
`--help` and a mistyped flag answer at once. A bad config, input, table or run ends with one
`embedpipe: error: ...` line and exit status 2 (`schemas.errors.USER_ERRORS`); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from embedpipe.args import COMMANDS, parse
from schemas.errors import USER_ERRORS

USAGE = "usage: embedpipe [-v] {" + ",".join(COMMANDS) + "} [--help] [options]"
# command -> (module, function), imported when the command runs
HANDLERS = {
    "run": ("embedpipe.stages", "run_all"),
    "preprocess": ("embedpipe.stages", "preprocess"),
    "train": ("embedpipe.stages", "train"),
    "export": ("embedpipe.stages", "export"),
    "publish": ("embedpipe.stages", "publish"),
    "gc": ("embedpipe.stages", "collect_garbage"),
    "example-data": ("embedpipe.commands", "example_data"),
    "neighbors": ("embedpipe.commands", "neighbors"),
    "recommend": ("embedpipe.commands", "recommend"),
    "clusters": ("embedpipe.commands", "clusters"),
    "report": ("embedpipe.commands", "report"),
}
NOISY_LOGGERS = ("apache_beam", "absl", "tensorflow", "tensorflow_transform", "tfx_bsl", "h5py", "jax")


def main(argv: list[str] | None = None) -> int:
    """Runs `embedpipe ARGV`; returns the exit status (0 done, 2 a usage or user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nTurn raw event logs into learned, reusable embeddings.\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<13} {text}")
        print("\n-v/--verbose also shows Beam and TensorFlow logs; `embedpipe COMMAND --help` lists its options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{USAGE}\nembedpipe: error: unknown command {command!r}", file=sys.stderr)
        return 2
    parse(command, rest)  # --help and bad flags exit here, before anything heavy is imported
    _setup_logging(verbose)
    # The deliberate lazy imports: TensorFlow and Beam load only for a command that runs.
    module, function = HANDLERS[command]
    handler = getattr(importlib.import_module(module), function)
    try:
        handler(rest)
    except USER_ERRORS as e:
        print(f"embedpipe: error: {e}", file=sys.stderr)
        return 2
    return 0


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())

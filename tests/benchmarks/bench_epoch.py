"""One training epoch of a collaborative model on an existing preprocessed run: examples/s.

Not collected by pytest. Run from the repository root on a run the scale benchmark (or
`embedpipe preprocess --config watchlogs ... --run-id bench`) has preprocessed:

    python tests/benchmarks/bench_epoch.py RUN_DIR --models two_tower bag_of_history
    python tests/benchmarks/bench_epoch.py RUN_DIR --models bag_of_history --user-chunk 8

It runs `trainer.retrieval.fit` for `--epochs` epochs on every training pair (no validation
slice, as the refit does) with the run's tables and the config's defaults, `--user-chunk`
overriding `training.user_chunk`, and prints each model's examples per second and epoch losses:
the training step and its input pipeline alone, without Beam, evaluation or export.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from schemas.loading import load_config  # noqa: E402
from schemas.manifest import read_manifest  # noqa: E402
from schemas.tables import TableSpec  # noqa: E402
from trainer import retrieval  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a preprocessed run directory (RUNS_ROOT/runs/ID)")
    parser.add_argument("--config", default="watchlogs")
    parser.add_argument("--models", nargs="+", default=["two_tower", "bag_of_history"])
    parser.add_argument("--user-chunk", type=int, help="override training.user_chunk")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.user_chunk is not None:
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, user_chunk=args.user_chunk))
    tables = read_manifest(args.run)["preprocess"]["tables"]
    data = retrieval.Data(config, args.run, {k: TableSpec.from_json_dict(v) for k, v in tables.items()})
    for name in args.models:
        model = retrieval.build(name, data.users, data.items, config.max_history)
        result = retrieval.fit(model, name, data, epochs=args.epochs, validate=False)
        losses = ", ".join(f"{x:.4f}" for x in result["losses"])
        print(
            f"{name} user_chunk={config.training.user_chunk}: {result['examples_per_s']:,.0f} examples/s, losses {losses}"
        )


if __name__ == "__main__":
    main()

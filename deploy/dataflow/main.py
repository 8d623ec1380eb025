"""Entry point of the Dataflow Flex Template image: `embedpipe preprocess` with template parameters.

Run by the image itself (`FLEX_TEMPLATE_PYTHON_PY_FILE`), or by hand in the image::

    python /template/main.py --config flights --input gs://BUCKET/logs/*.parquet \
        --output gs://BUCKET/embedpipe/flights --run_id 20261123 \
        --runner DataflowRunner --project PROJECT --region us-central1 \
        --temp_location gs://BUCKET/tmp --sdk_container_image IMAGE

Template parameters arrive as `--<name>=<value>`, named like Beam's own options (underscores):
`--run_id=X` becomes the CLI's `--run-id=X`, and a switch such as `--warm_start=true` becomes
`--warm-start` (`metadata.json` names each parameter after its argparse dest). Every other flag
is a Beam pipeline option, exactly as for `embedpipe preprocess`.

The job runs in this process's image on the launcher and on the workers (the same image is the
SDK container), so no `--setup_file` is needed or passed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from embedpipe import stages
from embedpipe.args import preprocess_parser

# The flag the Flex Template launcher adds: the job graph is written to this file and the service
# starts the job only after this process has exited.
TEMPLATE_LOCATION = "--template_location"


def cli_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, bool]]:
    """{`--dest`: (CLI flag, whether it is a switch)} for the parser's options."""
    flags = {}
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and not isinstance(action, argparse._HelpAction):
            flags[f"--{action.dest}"] = (long[0], action.nargs == 0)
    return flags


def translate(argv: list[str], flags: dict[str, tuple[str, bool]]) -> list[str]:
    """Template parameters to CLI flags: `--run_id=X` -> `--run-id=X` (`--run_id X` likewise);
    a switch `--warm_start=true` -> `--warm-start`, `--warm_start=false` -> nothing. Every other
    argument is passed on unchanged."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if name not in flags:
            out.append(arg)
            continue
        flag, switch = flags[name]
        if switch and sep and value.lower() in ("true", "false"):
            out.extend([flag] if value.lower() == "true" else [])
        else:
            out.append(flag + sep + value)
    return out


def is_template_launch(argv: list[str]) -> bool:
    return any(a == TEMPLATE_LOCATION or a.startswith(TEMPLATE_LOCATION + "=") for a in argv)


def preprocess_argv(argv: list[str]) -> list[str]:
    """The argv for `embedpipe.stages.preprocess`, from the launcher's argv."""
    return translate(argv, cli_flags(preprocess_parser()))


def main(argv: list[str] | None = None) -> dict | None:
    """Runs `embedpipe preprocess` with the template's parameters.

    Under a template launch (`--template_location`) the job only starts after this process
    exits, so it is submitted without waiting; the job writes its own row counts into the run
    (`preprocess/row_counts.json`) and `embedpipe train` finalises the manifest from them.

    Returns:
        The `preprocess` manifest section, or None for a template launch.
    """
    argv = preprocess_argv(list(sys.argv[1:] if argv is None else argv))
    return stages.preprocess(argv, wait=not is_template_launch(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()

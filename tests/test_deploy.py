"""deploy/, checked offline: the Flex Template image and metadata against the package and the CLI,
and the Airflow DAG's commands against the CLI that will run them.

Nothing here builds an image or talks to a cloud: the Dockerfile is read as text, the template
metadata as JSON, and each DAG command is handed to the real `embedpipe` entry point with the
stage's work replaced by a recorder. The DAG object itself is checked only where Airflow is
installed (it is not a test dependency: several hundred MB with pins of its own).
"""

import argparse
import ast
import importlib.metadata
import json
import os
import re
import shlex
import sys

import pytest
from packaging.requirements import Requirement

from embedpipe import args as cli_args
from embedpipe import cli, stages
from schemas import layout
from schemas.manifest import read_manifest

from support import FLEX_MAIN, ROOT, TINY_YAML, load_module

DATAFLOW = os.path.dirname(FLEX_MAIN)
DAG_FILE = os.path.join(ROOT, "deploy", "airflow", "embedpipe_dag.py")


@pytest.fixture(scope="module")
def launcher():
    return load_module(FLEX_MAIN, "embedpipe_flex_main")


@pytest.fixture(scope="module")
def dag_module():
    return load_module(DAG_FILE, "embedpipe_dag")


def _setup_kwargs() -> dict:
    """The literal keyword arguments of setup.py's setup(...) call."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kwargs = {}
    for kw in call.keywords:
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            pass  # computed values (long_description, packages)
    return kwargs


def _preprocess_parser() -> argparse.ArgumentParser:
    return cli_args.preprocess_parser()


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


# --- Flex Template metadata -------------------------------------------------------------------


def _metadata() -> dict:
    with open(os.path.join(DATAFLOW, "metadata.json"), encoding="utf-8") as f:
        return json.load(f)


def test_template_parameters_are_the_preprocess_flags():
    parameters = _metadata()["parameters"]
    options = _options(_preprocess_parser())
    # Named after argparse dests (`run_id` for --run-id): template parameters become `--name=value`.
    assert sorted(p["name"] for p in parameters) == sorted(a.dest for a in options)
    for p in parameters:
        assert p["label"] and p["helpText"], p
        assert all(re.compile(r) for r in p.get("regexes", []))
    required = {a.dest for a in options if a.required}
    assert not [p["name"] for p in parameters if p["name"] in required and p.get("isOptional", False)]
    switches = {a.dest for a in options if a.nargs == 0}  # store_true: the launcher takes true/false
    assert all(p["regexes"] == ["^(true|false)$"] for p in parameters if p["name"] in switches)


@pytest.mark.parametrize(
    "run_id", ["20261123", "2026-11-23", "r1.retry_2", "A" * 128, "", "-x", ".hidden", "a/b", "A" * 129, "a b"]
)
def test_template_run_id_rule_is_the_cli_rule(run_id):
    (parameter,) = [p for p in _metadata()["parameters"] if p["name"] == "run_id"]
    (regex,) = parameter["regexes"]
    try:
        cli_accepts = layout.check_run_id(run_id) == run_id
    except layout.RunError:
        cli_accepts = False
    assert bool(re.match(regex, run_id)) == cli_accepts


def test_launcher_passes_every_template_parameter_to_the_cli(launcher):
    switches = {a.dest for a in _options(_preprocess_parser()) if a.nargs == 0}
    values = {
        p["name"]: "true" if p["name"] in switches else f"gs://bucket/{p['name']}" for p in _metadata()["parameters"]
    }
    values["run_id"] = "20261123"
    beam = ["--runner=DataflowRunner", "--temp_location=gs://bucket/tmp", "--sdk_container_image=IMAGE"]
    argv = launcher.preprocess_argv([f"--{name}={value}" for name, value in values.items()] + beam)
    args, beam_args = _preprocess_parser().parse_known_args(argv)
    expected = {name: True if name in switches else value for name, value in values.items()}
    assert {name: getattr(args, name) for name in values} == expected
    assert beam_args == beam
    # A switch given as false is left out, so the CLI's default (off) holds.
    for name in switches:
        args, _ = _preprocess_parser().parse_known_args(launcher.preprocess_argv([f"--{name}=false"]))
        assert getattr(args, name) is False


def test_launcher_runs_preprocess_with_cli_flags(launcher, monkeypatch):
    seen = []
    monkeypatch.setattr(stages, "preprocess", lambda argv, wait: seen.append(argv) or {})
    launcher.main(["--config=taxi", "--output", "gs://b/root", "--run_id", "20261123", "--project=p"])
    assert seen == [["--config=taxi", "--output", "gs://b/root", "--run-id", "20261123", "--project=p"]]


def test_a_template_launch_submits_the_job_and_train_finalises_its_manifest(launcher, tmp_path, capsys):
    """A Flex Template launch cannot wait for its job: the job writes its own row counts and
    `embedpipe train` writes the manifest section from them (the DirectRunner, as locally)."""
    root, run = str(tmp_path / "root"), "20261123"
    argv = [f"--config={TINY_YAML}", f"--output={root}", f"--run_id={run}", f"--template_location={tmp_path}/job"]
    assert launcher.main(argv) is None
    run_dir = layout.run_dir(root, run)
    assert "preprocess" not in read_manifest(run_dir) and os.path.exists(layout.row_counts_path(run_dir))
    assert "submitted the preprocess job" in capsys.readouterr().out
    trained = stages.train(["--config", TINY_YAML, "--output", root, "--run-id", run, "--epochs", "1"])
    rows = read_manifest(run_dir)["preprocess"]["rows"]
    assert (rows["read"], rows["train"] + rows["eval"], rows["dead_letter"]) == (244, 240, 4)  # as a waited run
    assert trained["headline_metric"]["name"] == "mae"


# --- Dockerfile -------------------------------------------------------------------------------


def _dockerfile() -> tuple[str, dict]:
    text = open(os.path.join(DATAFLOW, "Dockerfile"), encoding="utf-8").read()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    return text, args


def test_dockerfile_pins_the_tested_beam_and_python():
    text, args = _dockerfile()
    setup = _setup_kwargs()
    beam = args["BEAM_VERSION"]
    assert beam == importlib.metadata.version("apache-beam")
    (beam_req,) = [Requirement(r) for r in setup["install_requires"] if Requirement(r).name == "apache-beam"]
    assert beam_req.specifier.contains(beam), (beam, str(beam_req))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert Requirement(f"python{setup['python_requires']}").specifier.contains(python + ".0")
    assert re.search(rf"^FROM apache/beam_python{re.escape(python)}_sdk:\$\{{BEAM_VERSION\}}$", text, re.M)
    assert f"python{python.replace('.', '')}-template-launcher-base" in args["LAUNCHER_IMAGE"]


def test_dockerfile_installs_this_package_version():
    text, args = _dockerfile()
    setup = _setup_kwargs()
    assert args["EMBEDPIPE_VERSION"] == setup["version"]
    install = re.search(r"^RUN pip install (.*)$", text, re.M).group(1)
    assert " . " in f" {install} " and '"apache-beam[gcp]==${BEAM_VERSION}"' in install
    # The build checks the installed versions against both ARGs.
    assert "'embedpipe': '${EMBEDPIPE_VERSION}'" in text and "'apache-beam': '${BEAM_VERSION}'" in text


def _constraints() -> dict[str, str]:
    lines = open(os.path.join(ROOT, "deploy", "constraints.txt"), encoding="utf-8").read().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {p.name: str(p.specifier).removeprefix("==") for p in pins}


def test_tests_and_image_install_the_same_constrained_versions():
    text, args = _dockerfile()
    pins = _constraints()
    install = re.search(r"^RUN pip install (.*)$", text, re.M).group(1)
    assert "-c constraints.txt" in install and "COPY deploy/constraints.txt ./constraints.txt" in text
    assert pins["apache-beam"] == args["BEAM_VERSION"]
    # this environment (the tests') runs exactly the pinned versions
    installed = {name: importlib.metadata.version(name) for name in pins}
    assert installed == pins
    # every pin fits setup.py's requirements; keras and tf-keras are declared
    required = {Requirement(r).name: Requirement(r) for r in _setup_kwargs()["install_requires"]}
    assert {"keras", "tf-keras"} <= set(required)
    for name, version in pins.items():
        if name in required:
            assert required[name].specifier.contains(version), (name, version, str(required[name]))
    # the README's install command is what CI runs
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    command = 'pip install -e ".[test]" -c deploy/constraints.txt'
    assert command in ci.splitlines() and command in readme


def test_dockerfile_copies_what_the_package_and_the_template_need():
    text, _ = _dockerfile()
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line]
    sources = {src for *srcs, _dest in copies for src in srcs}
    for src in sources:
        assert os.path.exists(os.path.join(ROOT, src)), f"COPY source {src} is not in the repository"
    assert {
        "embedpipe",
        "pipeline",
        "trainer",
        "schemas",
        "setup.py",
        "README.md",
        "deploy/constraints.txt",
    } <= sources  # setup.py reads README.md
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    py_file = re.search(r'^ENV FLEX_TEMPLATE_PYTHON_PY_FILE="(\S+)"$', text, re.M).group(1)
    assert ["deploy/dataflow/main.py", "./main.py"] in copies and py_file == f"{workdir}/main.py"
    assert "FLEX_TEMPLATE_PYTHON_SETUP_FILE" not in re.sub(r"#.*", "", text)  # the package is installed
    assert re.search(r'^ENTRYPOINT \["/opt/apache/beam/boot"\]$', text, re.M)


# --- Airflow DAG ------------------------------------------------------------------------------

BEAM_OPTIONS = "--runner DataflowRunner --project p --region us-central1 --temp_location gs://b/tmp"


def _commands(dag_module, **overrides) -> dict:
    values = dict(
        config="taxi",
        root="gs://b/embedpipe/taxi",
        run_id="20261123",
        input="gs://b/logs/2026-11-23/*.csv",
        stage_options="--warm-start",
        beam_options=BEAM_OPTIONS,
        train_options="--epochs 3",
    )
    return dag_module.stage_commands(**{**values, **overrides})


def test_dag_commands_are_the_four_stages_in_order(dag_module):
    commands = _commands(dag_module)
    run = "--output gs://b/embedpipe/taxi --run-id 20261123"
    source = "--config taxi --input 'gs://b/logs/2026-11-23/*.csv'"
    assert list(commands.items()) == [
        ("preprocess", f"embedpipe preprocess {source} {run} --warm-start {BEAM_OPTIONS}"),
        ("train", f"embedpipe train {source} {run} --warm-start --epochs 3"),
        ("export", f"embedpipe export {source} {run} --warm-start"),
        ("publish", f"embedpipe publish {run}"),
    ]
    assert tuple(commands) == dag_module.STAGES


def test_dag_commands_reach_the_stages_with_the_run_directory(dag_module, monkeypatch, tmp_path):
    """Each command, given to the real entry point, reaches its stage with ROOT/runs/ID."""
    root = str(tmp_path / "root")  # local: --warm-start looks for ROOT/LATEST (none yet)
    calls = {}

    def recorder(stage, result=None):
        def record(*args, **kwargs):
            calls[stage] = (*args, kwargs) if kwargs else args
            return result

        return record

    rows = {"read": 1, "train": 1, "eval": 0, "dead_letter": 0}
    trained = {"model_dir": "m", "headline_metric": {"name": "auc", "value": 0.5}, "eval_metrics": {"auc": 0.5}}
    monkeypatch.setattr(stages, "preprocess_job", recorder("preprocess", {"rows": rows}))
    monkeypatch.setattr(stages, "train_any", recorder("train", trained))
    monkeypatch.setattr(stages, "export_stage", recorder("export", {"dir": "d", "tables": {}}))
    monkeypatch.setattr(stages.runs, "publish", recorder("publish", {"run_dir": "runs/20261123"}))
    # the faked job wrote no manifest section, so train finalises one first (as after a template launch)
    monkeypatch.setattr(stages, "finalize_preprocess", recorder("finalize", {"rows": rows}))
    for stage, command in _commands(dag_module, root=root).items():
        argv = shlex.split(command)
        assert argv[:2] == ["embedpipe", stage]
        assert cli.main(argv[1:]) == 0

    run_dir = layout.run_dir(root, "20261123")
    config, out, beam_args, kwargs = calls["preprocess"]
    assert (config.name, config.input.path, out, kwargs) == (
        "taxi",
        "gs://b/logs/2026-11-23/*.csv",
        run_dir,
        {"wait": True},
    )
    assert beam_args == BEAM_OPTIONS.split()
    assert calls["finalize"][1] == run_dir
    assert calls["train"][1:] == (run_dir, {"baseline": False, "epochs": 3})
    assert calls["export"][1] == run_dir
    assert calls["publish"] == (root, "20261123", {"force": False})


def test_empty_dag_input_keeps_the_configs_input(dag_module, monkeypatch, tmp_path):
    seen = []
    rows = {"read": 1, "train": 1, "eval": 0, "dead_letter": 0}
    monkeypatch.setattr(
        stages, "preprocess_job", lambda config, output_dir, beam_args, wait: seen.append(config) or {"rows": rows}
    )
    default_path = stages.resolve(_preprocess_parser().parse_args(["--config", "taxi"]))[0].input.path
    stages.preprocess(shlex.split(_commands(dag_module, input="", root=str(tmp_path))["preprocess"])[2:])
    assert seen[0].input.path == default_path


def test_dag_templates_use_the_run_date_as_run_id(dag_module):
    commands = dag_module.dag_commands()
    assert tuple(commands) == dag_module.STAGES
    for stage, command in commands.items():
        assert "--run-id '{{ ds_nodash }}'" in command, stage
        assert "--output '{{ var.value.embedpipe_root }}'" in command, stage


def test_dag_object(dag_module):
    pytest.importorskip("airflow")
    dag = dag_module.dag
    assert dag.dag_id == dag_module.DAG_ID and dag.catchup is False
    assert str(getattr(dag, "schedule", None) or dag.schedule_interval) == "@daily"
    assert sorted(t.task_id for t in dag.tasks) == sorted(dag_module.STAGES)
    assert not dag.get_task(dag_module.STAGES[0]).upstream_task_ids
    for upstream, downstream in zip(dag_module.STAGES, dag_module.STAGES[1:]):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}
    assert {t.task_id: t.bash_command for t in dag.tasks} == dag_module.dag_commands()

"""Airflow DAG `embedpipe_daily`: preprocess -> train -> export -> publish, once a day.

Every task is one `embedpipe` command on the same versioned run, `--output ROOT --run-id
{{ ds_nodash }}` (the run's logical date, e.g. 20261123), so the day's run writes only inside
`ROOT/runs/20261123/`, and its last task, `embedpipe publish`, points `ROOT/LATEST` at it once the
run verifies complete. A failed or half-finished day never becomes LATEST.

Configured with Airflow Variables (read when a task runs, not when the file is parsed):

    embedpipe_root            required: the output root, e.g. gs://BUCKET/embedpipe/flights
    embedpipe_config          config name or path (default: departures)
    embedpipe_input           input file or glob; `{ds}` / `{ds_nodash}` become the run date
                              (default: empty, the config's input.path)
    embedpipe_stage_options   flags of preprocess, train and export alike, e.g. `--warm-start`
                              (start each table from the last published run's; default: empty)
    embedpipe_beam_options    Beam pipeline options of preprocess, e.g. `--runner DataflowRunner
                              --project P --region R --temp_location gs://BUCKET/tmp
                              --sdk_container_image IMAGE` (default: empty, local runner)
    embedpipe_train_options   extra flags of train, e.g. `--epochs 20` (default: empty)
    embedpipe_executable      the command, e.g. /opt/venv/bin/embedpipe (default: embedpipe)

The tasks are BashOperators, so the Airflow workers need `embedpipe` on their PATH; to run them in
the project's image instead, see deploy/README.md (KubernetesPodOperator, same commands).
`stage_commands` builds the commands and needs no Airflow; the DAG is only built where Airflow
imports.
"""

from __future__ import annotations

import datetime
import shlex

DAG_ID = "embedpipe_daily"
STAGES = ("preprocess", "train", "export", "publish")
RUN_ID = "{{ ds_nodash }}"


def _variable(name: str, default: str | None = None) -> str:
    """A Jinja expression for an Airflow Variable, rendered when the task runs."""
    # Double quotes inside: the command builder wraps values in single quotes.
    if default is None:
        return "{{ var.value." + name + " }}"  # a missing Variable fails the task, naming it
    return '{{ var.value.get("' + name + '", "' + default + '") }}'


# Run-date placeholders in the input pattern, replaced when the task runs.
INPUT = '{{ var.value.get("embedpipe_input", "") | replace("{ds}", ds) | replace("{ds_nodash}", ds_nodash) }}'


def stage_commands(
    *,
    config: str,
    root: str,
    run_id: str,
    input: str | None = None,
    stage_options: str = "",
    beam_options: str = "",
    train_options: str = "",
    executable: str = "embedpipe",
) -> dict[str, str]:
    """{stage: shell command} for one versioned run, in task order.

    Values are shell-quoted; `executable` (a command prefix), `stage_options` (preprocess, train
    and export), `beam_options` (preprocess) and `train_options` (train) are inserted as they
    are. An empty `input` leaves the config's input.path in force.
    """
    quote = shlex.quote
    run = f"--output {quote(root)} --run-id {quote(run_id)}"
    source = f"--config {quote(config)}" + (f" --input {quote(input)}" if input is not None else "")
    shared = stage_options.strip()
    exe = executable.strip()

    def command(*parts: str) -> str:
        return " ".join(p for p in parts if p)

    return {
        "preprocess": command(exe, "preprocess", source, run, shared, beam_options.strip()),
        "train": command(exe, "train", source, run, shared, train_options.strip()),
        "export": command(exe, "export", source, run, shared),
        "publish": command(exe, "publish", run),
    }


def dag_commands() -> dict[str, str]:
    """The commands of the DAG's tasks, as Jinja templates over the Variables and the run date."""
    return stage_commands(
        config=_variable("embedpipe_config", "departures"),
        root=_variable("embedpipe_root"),
        run_id=RUN_ID,
        input=INPUT,
        stage_options=_variable("embedpipe_stage_options", ""),
        beam_options=_variable("embedpipe_beam_options", ""),
        train_options=_variable("embedpipe_train_options", ""),
        executable=_variable("embedpipe_executable", "embedpipe"),
    )


def build_dag():
    """The DAG object; needs Airflow (2.4+ or 3)."""
    try:
        from airflow.sdk import DAG  # Airflow 3
    except ImportError:
        from airflow import DAG
    try:
        from airflow.providers.standard.operators.bash import BashOperator  # Airflow 3
    except ImportError:
        from airflow.operators.bash import BashOperator

    with DAG(
        dag_id=DAG_ID,
        description="embedpipe preprocess -> train -> export -> publish, run id = run date",
        schedule="@daily",
        start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        catchup=False,
        # One run at a time: runs share ROOT, and publish moves LATEST to whichever finishes last.
        max_active_runs=1,
        default_args={"retries": 1, "retry_delay": datetime.timedelta(minutes=10)},
        doc_md=__doc__,
        tags=["embedpipe"],
    ) as dag:
        tasks = [BashOperator(task_id=stage, bash_command=command) for stage, command in dag_commands().items()]
        for upstream, downstream in zip(tasks, tasks[1:]):
            upstream >> downstream
    return dag


try:
    import airflow  # noqa: F401
except ImportError:  # the commands above stay importable (and testable) without Airflow
    dag = None
else:
    dag = build_dag()

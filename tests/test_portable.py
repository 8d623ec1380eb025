"""Portable execution: the preprocess job submitted through Beam's job API, as Flink and Spark take it.

A module fixture starts Beam's Python local job service (`local_job_service_main`) and an external
SDK worker pool (`worker_pool_main`) as subprocesses on loopback; the job is submitted with
`--runner PortableRunner --job_endpoint ... --environment_type EXTERNAL --environment_config ...`,
so the pipeline is serialized to its runner-API proto, staged, and executed by SDK harness
processes the worker pool starts — nothing runs in the submitting process. Its outputs must equal
the same job's on the default local runner. Ordering and shard layout may differ between runners,
so examples and dead letters are compared as sorted multisets.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from embedpipe import stages
from schemas import layout

from support import TINY_WATCH_YAML, examples, preprocess_outputs, read_dir
from support import TINY_YAML as TINY

STARTUP_TIMEOUT_S = 60
JOB_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{open(log_path).read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{proc.args} not listening on port {port} after {STARTUP_TIMEOUT_S}s:\n{open(log_path).read()}")


def _start(args: list[str], log_path: str) -> subprocess.Popen:
    # Own session (process group): the worker pool starts SDK harness subprocesses of its own, and
    # teardown must take those down too even if a job failed before stopping its workers.
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    """Ends the process and whatever is left of its process group (the harness processes)."""
    try:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


class PortableServices:
    """A Beam local job service and an external worker pool, as subprocesses on loopback."""

    def __init__(self, log_dir):
        self.logs = {"job_service": str(log_dir / "job_service.log"), "worker_pool": str(log_dir / "worker_pool.log")}
        self.ports = {"job_service": _free_port(), "worker_pool": _free_port()}
        self.procs = {}
        self.procs["job_service"] = _start(
            ["apache_beam.runners.portability.local_job_service_main", "--port", str(self.ports["job_service"])],
            self.logs["job_service"],
        )
        # Starts one SDK harness subprocess (`python -c ...SdkHarness(...).run()`) per worker a job asks for.
        self.procs["worker_pool"] = _start(
            ["apache_beam.runners.worker.worker_pool_main", "--service_port", str(self.ports["worker_pool"])],
            self.logs["worker_pool"],
        )

    def stop(self) -> None:
        for name in ("worker_pool", "job_service"):
            if name in self.procs:
                _stop(self.procs[name])

    def log_tails(self, chars: int = 4000) -> str:
        return "\n".join(
            f"--- {name} log (tail) ---\n{open(path, errors='replace').read()[-chars:]}"
            for name, path in self.logs.items()
        )

    def run_preprocess(self, argv: list[str]) -> dict:
        """`stages.preprocess(argv)` submitted to the job service. The job runs in the job service and
        in harness processes, so a hang would not end on its own: a watchdog kills the services
        after JOB_TIMEOUT_S, which makes the submission fail instead."""
        for name in ("job_service", "worker_pool"):
            _wait_listening(self.ports[name], self.procs[name], self.logs[name])
        watchdog = threading.Timer(JOB_TIMEOUT_S, self.stop)
        watchdog.daemon = True
        watchdog.start()
        try:
            return stages.preprocess(
                [
                    *argv,
                    "--runner",
                    "PortableRunner",
                    "--job_endpoint",
                    f"localhost:{self.ports['job_service']}",
                    "--environment_type",
                    "EXTERNAL",
                    "--environment_config",
                    f"localhost:{self.ports['worker_pool']}",
                ]
            )
        except Exception as e:
            raise AssertionError(f"portable run failed: {e!r}\n{self.log_tails()}") from e
        finally:
            watchdog.cancel()


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """Starts the services; tests wait for them only when they submit, so the start-up overlaps
    their local baseline run."""
    services = None
    try:
        services = PortableServices(tmp_path_factory.mktemp("portable_logs"))
        yield services
    finally:
        if services is not None:
            services.stop()


def _assert_same_outputs(local_out: str, local: dict, portable_out: str, portable: dict) -> None:
    # Counters come back through the job service's GetJobMetrics: rows and dead letters per reason.
    assert portable["rows"] == local["rows"]
    assert portable["tables"] == local["tables"]
    assert portable.get("users_evaluated") == local.get("users_evaluated")
    outputs = preprocess_outputs(local_out)
    assert outputs["train"] and outputs["eval"]  # (a collaborative eval example holds several rows)
    assert len(outputs["dead_letters"]) == local["rows"]["dead_letter"]
    assert preprocess_outputs(portable_out) == outputs


def test_portable_runner_matches_local_runner(portable, tmp_path):
    local_out, portable_out = str(tmp_path / "local"), str(tmp_path / "portable")
    local = stages.preprocess(["--config", TINY, "--output", local_out])
    portable_section = portable.run_preprocess(["--config", TINY, "--output", portable_out])
    rows = local["rows"]
    assert rows["read"] == 244 and rows["dead_letter"] == 4
    assert [len(examples(local_out, split)) for split in ("train", "eval")] == [rows["train"], rows["eval"]]
    assert read_dir(os.path.join(layout.transform_dir(local_out), "transform_fn", "assets"))
    _assert_same_outputs(local_out, local, portable_out, portable_section)


@pytest.mark.slow
def test_portable_runner_matches_local_runner_collaborative(portable, tmp_path):
    from pipeline import synthetic

    logs = synthetic.generate_watch_logs(num_users=60, num_items=40, num_groups=3, mean_interactions=8, seed=3)
    synthetic.write_watch_logs(logs, str(tmp_path))
    shutil.copy(TINY_WATCH_YAML, tmp_path / "watch.yaml")
    config = str(tmp_path / "watch.yaml")
    local_out, portable_out = str(tmp_path / "local"), str(tmp_path / "portable")
    local = stages.preprocess(["--config", config, "--output", local_out])
    portable_section = portable.run_preprocess(["--config", config, "--output", portable_out])
    assert local["rows"]["read"] == logs.interactions.num_rows and local["users_evaluated"] > 0
    _assert_same_outputs(local_out, local, portable_out, portable_section)

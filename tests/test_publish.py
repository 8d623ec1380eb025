"""Concurrent publishers: of several that start from the same `LATEST`, exactly one moves it.

Eight worker processes (spawned once for the module) read `LATEST`, wait for each other, then
publish at the same moment: on a local disk the whole `embedpipe.runs.publish` (verify, drift,
`_COMPLETE`, the pointer), on a local GCS emulator (fake-gcs-server on 127.0.0.1, started and
stopped here) the pointer's compare and swap (`schemas.layout.replace_latest`), which is what
guards a gs:// root. The 20-round versions are `slow`.
"""

import multiprocessing
import os

import pytest

from embedpipe import runs
from schemas import layout

from support import fake_run as _fake_run

PUBLISHERS = 8


def _publish(root: str, run_id: str, barrier) -> str:
    pointer = layout.read_latest(root)
    barrier.wait(timeout=120)  # everyone has read the same LATEST before anyone writes
    try:
        runs.publish(root, run_id, expected=pointer)
    except layout.PublishConflict as e:
        return f"conflict: {e}"
    return "won"


def _swap(root: str, run_id: str, barrier) -> str:
    pointer = layout.read_latest(root)
    barrier.wait(timeout=120)
    try:
        layout.replace_latest(root, pointer, {"run_id": run_id, "run_dir": f"runs/{run_id}"})
    except layout.PublishConflict as e:
        return f"conflict: {e}"
    return "won"


@pytest.fixture(scope="module")
def pool(gcs):  # after the emulator: the workers inherit STORAGE_EMULATOR_HOST
    context = multiprocessing.get_context("spawn")  # TensorFlow and fork do not mix
    with context.Manager() as manager, context.Pool(PUBLISHERS) as workers:
        yield workers, manager.Barrier(PUBLISHERS)


def _rounds(pool, work, root, rounds, prepare=lambda run_id: None):
    workers, barrier = pool
    for r in range(rounds):
        ids = [f"r{r:02d}-{i}" for i in range(PUBLISHERS)]
        for run_id in ids:
            prepare(run_id)
        outcomes = workers.starmap(work, [(root, run_id, barrier) for run_id in ids])
        won = [run_id for run_id, outcome in zip(ids, outcomes) if outcome == "won"]
        assert len(won) == 1, (r, outcomes)
        assert all("another publisher won" in o for o in outcomes if o != "won")
        yield ids, won[0]


@pytest.mark.parametrize("rounds", [3, pytest.param(20, marks=pytest.mark.slow)])
def test_concurrent_publishers_on_local_disk_leave_one_verified_winner(pool, tmp_path, rounds):
    root = str(tmp_path / "root")
    for ids, winner in _rounds(pool, _publish, root, rounds, prepare=lambda run_id: _fake_run(root, run_id)):
        assert layout.latest(root) == layout.run_dir(root, winner)
        runs.verify(layout.latest(root))  # the run LATEST names is complete and verifies
        losers = [i for i in ids if i != winner]
        assert not any(layout.is_complete(layout.run_dir(root, i)) for i in losers)  # still publishable
    runs.publish(root, losers[0])  # a loser publishes later, from the state it then reads
    assert layout.latest(root) == layout.run_dir(root, losers[0])
    assert not [f for f in os.listdir(root) if ".tmp-" in f]


@pytest.mark.parametrize("rounds", [3, pytest.param(20, marks=pytest.mark.slow)])
def test_concurrent_pointer_swaps_on_a_gcs_emulator_have_one_winner(pool, gcs, rounds):
    root = f"{gcs}/swaps-{rounds}"
    for _, winner in _rounds(pool, _swap, root, rounds):
        assert layout.read_latest(root).data["run_id"] == winner

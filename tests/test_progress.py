"""Progress lines: counts, rate and ETA at most every `every_s`, and a heartbeat between them."""

import logging
import time

import pytest

from schemas import progress as progress_module
from schemas.progress import Heartbeat, Progress


@pytest.fixture
def clock(monkeypatch):
    """A fake clock for `schemas.progress`, moved by hand: `clock.now += 10`."""

    class Clock:
        now = 1000.0

        def __call__(self):
            return self.now

    fake = Clock()
    monkeypatch.setattr(progress_module, "_clock", fake)
    monkeypatch.setattr(Progress, "_last_line", fake.now)
    return fake


def test_lines_give_count_share_rate_and_eta(caplog, clock):
    caplog.set_level(logging.INFO)
    logger = logging.getLogger("test.progress")
    progress = Progress(logger, "work", total=1000, unit="rows", every_s=30)
    clock.now += 10
    progress.add(100)  # not due: a line came (the fixture's) 10 s ago
    clock.now += 20
    progress.add(150)  # due: 30 s without a line
    clock.now += 5
    progress.add(10)  # not due again so soon
    clock.now += 5
    progress.done()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "work: 250/1,000 rows (25%), 8 rows/s, ETA 90s",
        "work: done, 260/1,000 rows (26%), 6 rows/s in 40s",
    ]


def test_the_clock_is_shared_by_every_progress_of_the_process(caplog, clock):
    caplog.set_level(logging.INFO)
    logger = logging.getLogger("test.progress")
    for step in range(4):  # four short steps of 20 s each, none with 30 s of its own
        progress = Progress(logger, f"step {step}", every_s=30)
        clock.now += 20
        progress.add(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["step 1: 1 rows, 0 rows/s", "step 3: 1 rows, 0 rows/s"]


def test_heartbeat_speaks_only_when_everything_else_is_quiet(caplog):
    caplog.set_level(logging.INFO)
    logger = logging.getLogger("test.progress")
    Progress(logger, "earlier step", unit="rows").done()
    beats = []
    with Heartbeat(logger, "job", every_s=0.2):
        deadline = time.monotonic() + 30
        while not beats and time.monotonic() < deadline:
            time.sleep(0.05)
            beats = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert beats and beats[0].startswith("job: still running after 0s (last: earlier step: done, 0 rows")

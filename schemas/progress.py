"""Progress lines for long work: how much is done, how fast, and when it ends.

    progress = Progress(logger, "train two_tower epoch 1/10", total=5_000_000, unit="examples")
    for batch in batches:
        ...
        progress.add(len(batch))        # logs at most every `every_s` seconds
    progress.done()                     # one closing line with the totals

A line reads `train two_tower epoch 1/10: 1,250,000/5,000,000 examples (25%), 210,000 examples/s,
ETA 18s`. Used by the Beam job's steps (per worker), each training epoch, the evaluation and
the export, so that nothing long runs for more than ~30 s without a line. The clock is shared by
every `Progress` of the process: a line is due when the process has had no progress line for
`every_s`, so several short steps in a row (the Beam job's) still give a line every ~`every_s`.
"""

from __future__ import annotations

import logging
import threading
import time

EVERY_S = 30.0
_clock = time.monotonic  # one clock for every line and rate (a fake one in the tests)


class Progress:
    """Counts work done and logs a progress line when no progress line came for `every_s` seconds.

    Args:
        logger: where the lines go (INFO).
        what: what is being done, the start of every line.
        total: how much there is to do, if known (then the line has a share and an ETA).
        unit: what is counted ("rows", "examples", "users").
        every_s: the least time between two lines.
    """

    def __init__(
        self, logger: logging.Logger, what: str, total: int | None = None, unit: str = "rows", every_s: float = EVERY_S
    ):
        self.logger, self.what, self.total, self.unit, self.every_s = logger, what, total, unit, every_s
        self.count = 0
        self.started = _clock()

    _last_line = _clock()  # when any Progress of the process last logged
    latest: str = ""  # the last line any Progress logged, for `Heartbeat`

    def add(self, n: int = 1) -> None:
        """Counts `n` more; logs a line when no progress line came for `every_s` seconds."""
        self.count += n
        now = _clock()
        if now - Progress._last_line >= self.every_s:
            Progress._last_line = now
            Progress.latest = f"{self.what}: {self.line(now)}"
            self.logger.info("%s", Progress.latest)

    def line(self, now: float | None = None, eta: bool = True) -> str:
        """`done[/total] unit (share), rate unit/s[, ETA]` as of `now` (no ETA when `eta` is false)."""
        elapsed = max((_clock() if now is None else now) - self.started, 1e-9)
        rate = self.count / elapsed
        text = f"{self.count:,}"
        if self.total:
            text += f"/{self.total:,} {self.unit} ({100 * self.count / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.0f} {self.unit}/s"
        if eta and self.total and rate > 0 and self.count < self.total:
            text += f", ETA {_duration((self.total - self.count) / rate)}"
        return text

    def done(self) -> float:
        """Logs the closing line (totals, rate, time taken); returns the seconds taken."""
        Progress._last_line = now = _clock()
        elapsed = now - self.started
        Progress.latest = f"{self.what}: done, {self.line(now, eta=False)} in {_duration(elapsed)}"
        self.logger.info("%s", Progress.latest)
        return elapsed


class Heartbeat:
    """A line every `every_s` seconds while work without progress lines of its own runs.

        with Heartbeat(logger, "preprocess"):
            result = pipeline.run()       # e.g. tf.Transform's analysis, between our own steps

    Whenever the process has had no progress line for `every_s`, a background thread logs
    `preprocess: still running after 2m30s (last: <the last progress line>)`.
    """

    def __init__(self, logger: logging.Logger, what: str, every_s: float = EVERY_S):
        self.logger, self.what, self.every_s = logger, what, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {what}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.started = _clock()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(min(5.0, self.every_s)):
            now = _clock()
            if now - Progress._last_line >= self.every_s:
                Progress._last_line = now
                last = f" (last: {Progress.latest})" if Progress.latest else ""
                self.logger.info("%s: still running after %s%s", self.what, _duration(now - self.started), last)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 120:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"

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
import time

EVERY_S = 30.0


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
        self.started = time.monotonic()

    _last_line = time.monotonic()  # when any Progress of the process last logged

    def add(self, n: int = 1) -> None:
        """Counts `n` more; logs a line when no progress line came for `every_s` seconds."""
        self.count += n
        now = time.monotonic()
        if now - Progress._last_line >= self.every_s:
            Progress._last_line = now
            self.logger.info("%s: %s", self.what, self.line(now))

    def line(self, now: float | None = None) -> str:
        """`done[/total] unit (share), rate unit/s[, ETA]` as of `now`."""
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.count / elapsed
        text = f"{self.count:,}"
        if self.total:
            text += f"/{self.total:,} {self.unit} ({100 * self.count / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.0f} {self.unit}/s"
        if self.total and rate > 0 and self.count < self.total:
            text += f", ETA {_duration((self.total - self.count) / rate)}"
        return text

    def done(self) -> float:
        """Logs the closing line (totals, rate, time taken); returns the seconds taken."""
        Progress._last_line = now = time.monotonic()
        elapsed = now - self.started
        self.logger.info("%s: done, %s in %s", self.what, self.line(now), _duration(elapsed))
        return elapsed


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 120:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"

"""Stopping a run on SIGTERM/SIGINT: the signal handler, and the agreed stop's last save
within the preemption grace period."""

from __future__ import annotations

import signal
import time

from jaxzero.monitor.writer import Console
from jaxzero.parallel import distributed
from jaxzero.rl.setup import RunFiles, TrainState, save_checkpoint


class StopRequested(BaseException):
    """SIGTERM/SIGINT before the loop runs (setup, the demo warm-up): nothing to save yet."""


class StopSignal:
    """SIGTERM/SIGINT (preemption). With `interrupt`, during setup, they interrupt at once
    (StopRequested); otherwise, and once the loop runs, they only ask it to finish the step,
    save and exit cleanly. Each process sees only its own signals: the loop stops when the
    processes agree one was."""

    def __init__(self, interrupt: bool = True):
        self.received: str | None = None
        self.interrupt = interrupt
        self._at: float | None = None   # when the first signal came (monotonic seconds)
        self._previous = {}

    def waited(self) -> float:
        """Seconds since the first signal (0 before one): the grace period spent."""
        return 0.0 if self._at is None else time.monotonic() - self._at

    def agreed(self) -> bool:
        """Whether any process was asked to stop (one collective across the processes: call
        on all of them at the same point)."""
        return distributed.agree_stop(self.received is not None)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self._at is None:
            self._at = time.monotonic()
        self.received = signal.Signals(signum).name
        if self.interrupt:
            raise StopRequested(self.received)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# A final save is started on a stop only when the grace period left is this many times the
# last save's start-to-commit time: a save can take longer than the one before.
SAVE_MARGIN = 1.5


def final_save_fits(left_s: float | None, last_save_s: float | None) -> bool:
    """Whether a save should start with `left_s` seconds of the grace period left (None: no
    deadline), given the last committed save took `last_save_s` (None: none measured, so
    try: the commit is atomic, a save killed before it leaves the last one the good one)."""
    if left_s is None:
        return True
    if last_save_s is None:
        return left_s > 0
    return left_s >= SAVE_MARGIN * last_save_s


def save_on_stop(files: RunFiles, state: TrainState, stop: StopSignal, console: Console
                 ) -> None:
    """The agreed stop's save of `state`, unless trainer.preemption_grace_s says it cannot
    commit before the SIGKILL: then the last committed checkpoint stays the good one. Every
    process decides from the same agreed values, so all save or none does."""
    files.store.wait()  # a periodic save in flight: committed first, then timed
    latest = files.store.latest_step()  # every process made the same saves: the same step
    if latest == state.step:
        return
    grace = files.cfg.trainer.preemption_grace_s
    left, last_s = None, None
    if grace is not None:
        measured = files.store.save_seconds(latest) if latest is not None else None
        # Agreed now, so every process decides alike (-1: no save measured).
        waited, last = distributed.agree_max([stop.waited(),
                                              -1.0 if measured is None else measured])
        left, last_s = grace - waited, (None if last < 0 else last)
    if not final_save_fits(left, last_s):
        took = "" if last_s is None else f" and the last save took {last_s:.1f} s"
        console.always(
            f"not saving step {state.step}: {max(left, 0.0):.1f} s of "
            f"trainer.preemption_grace_s={grace:g} are left{took}; the last committed "
            f"checkpoint, {files.last_good_checkpoint()}, stays the one to resume from")
        return
    save_checkpoint(files, state, log=console.info, force=True)
    files.store.wait()

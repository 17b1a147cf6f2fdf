"""Stops that survive preemption: SIGTERM, SIGINT and SIGUSR1 end training cleanly.

Cluster schedulers stop jobs with SIGTERM (SLURM can warn with SIGUSR1 before the time
limit). While train() or run() runs in the main thread, StopSignals replaces the handlers
of these three signals: during training a signal only asks for a stop, and the loop
finishes the current step (under torchrun every rank agrees on the step), writes last.pt
with the position inside the epoch and raises TrainingInterrupted. After training (run()'s
pictures and test evaluation, where there is nothing to save) a signal raises
TrainingInterrupted at once. A second SIGINT while a stop is pending raises
KeyboardInterrupt (the files on disk stay whole: every write is atomic). The previous
handlers come back when the outermost train()/run() returns.

`hvae-fast train` exits with EXIT_INTERRUPTED (75, sysexits' EX_TEMPFAIL: "try again")
after such a stop.

Test hook: HVAE_FAST_TEST_SIGNAL=NAME:STEP[:RANK] (e.g. SIGTERM:7:1) makes the training
loop send itself signal NAME with os.kill when its step counter reaches STEP (on rank RANK
only under torchrun; every rank when left out); the real handlers then take it.
"""
import os
import signal
import threading

EXIT_INTERRUPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the user is invited to retry
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
TEST_HOOK = "HVAE_FAST_TEST_SIGNAL"


class TrainingInterrupted(Exception):
    """Training (or the evaluation after it) stopped on a signal. `signal_name`: e.g.
    "SIGTERM"; `info`: where it stopped and how to resume (what summary.json records)."""

    def __init__(self, message, signal_name, info):
        super().__init__(message)
        self.signal_name, self.info = signal_name, info


def signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """A context manager that catches SIGTERM, SIGINT and SIGUSR1 (main thread only; in
    other threads it installs nothing). Re-entrant: an inner one shares the outer's state."""

    _active = None  # the outermost one while it is entered

    def __init__(self):
        self.signum = None      # the first signal caught
        self.immediate = False  # raise from the handler instead of asking for a stop
        self._previous = {}
        self._depth = 0
        self._owner = None  # the one entered: this, or the outer one

    @property
    def requested(self):
        return self.signum is not None

    def __enter__(self):
        outer = StopSignals._active
        if outer is not None:
            outer._depth += 1
            self._owner = outer
            return outer
        StopSignals._active = self._owner = self
        self._depth = 1
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        owner, self._owner = self._owner, None
        owner._depth -= 1
        if owner._depth == 0:
            for s, old in owner._previous.items():
                signal.signal(s, old if old is not None else signal.SIG_DFL)
            owner._previous = {}
            StopSignals._active = None
        return False

    def _handle(self, signum, frame):
        if self.signum is not None and signum == getattr(signal, "SIGINT", None):
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
        if self.immediate:
            self.raise_now("the test evaluation")

    def raise_now(self, during):
        name = signal_name(self.signum)
        raise TrainingInterrupted(f"{during} stopped by {name}; training is complete and --resume runs "
                                  f"{during} again", name, {"signal": name, "during": during})


def ignore_stop_signals():
    """For a torchrun rank that exits after a stop: once one rank has exited, torchrun's agent
    sends SIGTERM to the others, which are exiting with the same status. Python puts a Python
    handler back to SIG_DFL while the interpreter finalizes (the rank would then die of the
    signal, -15), but leaves SIG_IGN in place."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def test_hook(rank):
    """The test hook, read once when training starts: a function of the step that sends the
    signal HVAE_FAST_TEST_SIGNAL names at its step, or None where it is unset (or names
    another rank)."""
    spec = os.environ.get(TEST_HOOK)
    if not spec:
        return None
    name, at, *who = spec.split(":")
    if who and int(who[0]) != rank:
        return None
    signum, at = getattr(signal, name), int(at)
    return lambda step: os.kill(os.getpid(), signum) if step == at else None

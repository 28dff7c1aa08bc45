"""How a script runs and ends, the same for every script: `run_main` is each one's entry point.

Exit 0 on success; 1 with one `error: ...` line on any failure, naming the stage that failed (`stage`), after a
traceback unless the line says it all; 128 + N after signal N (the training answers SIGUSR1, SIGTERM and a first
Ctrl-C itself with `StopSignal`: it saves a checkpoint and exits 75). Worker processes ignore stop signals and are
killed on every exit, so a failed run never waits on them. Files and folders are written whole or not at all.
"""

import faulthandler
import gc
import multiprocessing
import os
import shutil
import signal
import sys
import traceback
from contextlib import contextmanager

STOP_SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")


STAGE_NOTE = "stage: "


class RunStopped(RuntimeError):
    """The run stopped on purpose for a reason its message states whole (a NaN loss, too many bad clips)."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT, raised in the main thread (like KeyboardInterrupt, so `except Exception` lets it pass)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stage(name):
    """Name the work inside the block in the error line of a failure there (an inner stage's name wins)."""
    try:
        yield
    except (Exception, Interrupted) as error:
        if not stage_of(error):
            error.add_note(STAGE_NOTE + name)
        raise


def stage_of(error):
    notes = [note for note in getattr(error, "__notes__", []) if note.startswith(STAGE_NOTE)]
    return notes[0][len(STAGE_NOTE) :] if notes else None


def failure_line(error):
    """`error: STAGE: Type: message`, the last line a failed script prints. The message is its first line, or its
    last where it quotes a traceback (a DataLoader worker's error arrives as one: the last line is the cause)."""
    lines = str(error).strip().splitlines() or [""]
    message = (
        lines[-1] if any(line.startswith("Traceback") or "Original Traceback" in line for line in lines) else lines[0]
    )
    where = f"{stage_of(error)}: " if stage_of(error) else ""
    return f"error: {where}{type(error).__name__}: {message}"


class StopSignal:
    """Remembers SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption, scancel, a time limit without
    --signal) or a first Ctrl-C until the current step is done; the loop then saves a checkpoint and exits 75. A
    second Ctrl-C stops at once. `restore` puts the previous handlers back."""

    def __init__(self):
        self.received = None  # the name of the first stop signal
        self.previous = {}
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                self.previous[name] = signal.signal(getattr(signal, name), self.handle)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received:
            raise KeyboardInterrupt
        if not self.received:
            print(f"{name}: finishing this step, then saving a checkpoint (Ctrl-C again stops at once)", flush=True)
        self.received = self.received or name

    def restore(self):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of every DataLoader: the workers leave stop signals to the main process, which finishes its
    work with their data and then ends them (stop_worker_processes)."""
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def stop_worker_processes(timeout=5.0):
    """Kill and reap this process's worker processes (DataLoader and decode workers). They ignore stop signals, so
    Python's exit, which only sends them SIGTERM, would otherwise wait on them forever after a failure."""
    children = multiprocessing.active_children()
    if children and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's loader would raise on the deaths it did not cause
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout)


@contextmanager
def file_written_whole(path):
    """Yield a temporary name to write; it replaces PATH on success and is removed on any failure, so an interrupted
    write never leaves a partial file under PATH."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


@contextmanager
def folder_written_whole(path):
    """The same for a folder: fill PATH.tmp; on success it replaces PATH, on any failure it is removed."""
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def failure_message(error, bad_input):
    """The last line and exit code of a failed run; the traceback is printed first unless the line says it all."""
    if isinstance(error, (Interrupted, KeyboardInterrupt)):
        signum = getattr(error, "signum", signal.SIGINT)
        where = f" during {stage_of(error)}" if stage_of(error) else ""
        return f"error: stopped by {signal.Signals(signum).name}{where}", 128 + signum
    if isinstance(error, RunStopped) or (isinstance(error, bad_input) and not stage_of(error)):
        return f"error: {error}", 1
    traceback.print_exc()
    return failure_line(error), 1


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


# Seconds the way out may take once main has returned or failed. Past them every thread's stack is printed and the
# process exits 1: a run never hangs on its way out, and the stacks say where it would have.
EXIT_TIMEOUT = 120


def run_main(main, parse_args, bad_input=(ValueError, FileNotFoundError)):
    """A script's entry point: parse, run `main`, and exit with its code (an int; anything else counts as 0).

    Bad input and deliberate stops end in one `error: ...` line; any other failure prints its traceback and then
    `error: STAGE: Type: message` as the last line. SIGTERM and SIGINT unwind the main thread (files being written
    are finished or removed) and exit 128 + N. On every path the worker processes are killed before Python exits, and
    a way out that takes longer than EXIT_TIMEOUT ends in every thread's stack and exit code 1.
    """
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    message = None
    try:
        code = main(parse_args())
        code = code if isinstance(code, int) else 0
    except (Exception, Interrupted, KeyboardInterrupt) as error:
        ignore_stop_signals()  # the run is over: a late signal (a launcher ending the other ranks) must not cut this
        message, code = failure_message(error, bad_input)
    finally:
        faulthandler.dump_traceback_later(EXIT_TIMEOUT, exit=True)
        stop_worker_processes()
    if message:
        gc.collect()  # the failed run's progress bars print once more as they close: before the last line, not after
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)

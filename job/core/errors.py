"""The exit-code contract with Slurm, Kubernetes and the person on call, and the errors that carry it.

| code | meaning | what to do | Helm podFailurePolicy | Slurm script |
|---|---|---|---|---|
| 0 | done | | | |
| 1 | bad input data or an unusable environment (no internet: a host that does not resolve) | fix it | FailJob | fail |
| 2 | a bad flag or config value | fix the command | FailJob | fail |
| 70 | an internal error (a bug) | report it | counts against backoffLimit | requeue, bounded |
| 75 | try again: preempted after a checkpoint, or an outage past the retries | rerun | Ignore | requeue, bounded |

Every non-zero exit prints exactly one line on stderr (``Error: ...``) and logs one event.
SIGTERM, SIGUSR1 and SIGINT end any stage with 75: what was complete is kept, the manifest says where
the run stopped, and a rerun of the same command continues.
"""

import errno
import signal
import sys
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    BAD_DATA = 1
    BAD_CONFIG = 2
    INTERNAL = 70  # EX_SOFTWARE
    RETRY = 75  # EX_TEMPFAIL


class JobError(RuntimeError):
    """Bad input or an unusable environment; ``str(error)`` is one line naming what is wrong."""

    exit_code = ExitCode.BAD_DATA


class ConfigError(JobError, ValueError):
    """A configuration value that cannot work; the message names the field or flag."""

    exit_code = ExitCode.BAD_CONFIG


class TransientError(JobError):
    """An outage that outlasted the retries (object store, judge, network); the state is kept, so a
    rerun of the same command continues where this one stopped."""

    exit_code = ExitCode.RETRY


class DiskFullError(TransientError):
    """No room for a write; the partial file is removed and earlier checkpoints are intact."""


class Interrupted(TransientError):
    """SIGTERM, SIGUSR1 or SIGINT ended the job outside the training loop (exit 75): what was complete
    is kept; ``where`` is the stage it stopped in, where one was running."""

    def __init__(self, signum: int, where: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signal_name, self.where = signal.Signals(signum).name, where

    def __str__(self) -> str:
        where = f" in stage {self.where}" if self.where else ""
        return f"stopped by {self.signal_name}{where}: what was complete is kept; rerun the same command to continue"


class Preempted(TransientError):
    """SIGTERM/SIGUSR1/SIGINT arrived during training: a checkpoint was written and the job should be
    requeued (exit 75)."""


def stopped_by_signal(exc: BaseException) -> bool:
    """Whether ``exc`` is a stop signal's (the manifest says interrupted, not failed)."""
    return isinstance(exc, Interrupted | Preempted)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def raise_on_stop_signals():
    """From now on SIGTERM, SIGUSR1 and SIGINT raise ``Interrupted`` in the main thread, wherever it is
    (a download, a decoding batch, a wait for the judge or the store); the training loop installs its
    own handlers, which checkpoint first. Only the first signal raises; later ones are ignored, so the
    way out (manifest, one line) is not cut short. Returns a function that puts the previous handlers
    back (where no signal came: after one, the process is on its way out and keeps ignoring them)."""
    fired = []

    def handler(signum, frame):
        fired.append(signum)
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    def restore() -> None:
        if not fired:
            for s, h in previous.items():
                signal.signal(s, h)

    return restore


def as_job_error(exc: BaseException) -> JobError | None:
    """The contract's error for ``exc``: itself, a lost peer or a full disk (75), or None for a bug (70)."""
    if isinstance(exc, JobError):
        return exc
    if _lost_peer(exc):
        return TransientError(
            f"lost contact with another process of the group ({_one_line(exc)[:120]}): "
            "rerun every node to resume from the last checkpoint"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = exc.filename or "the output"
        return DiskFullError(
            f"no space left on device writing {where}: free space (or point --output/--scratch elsewhere) and rerun"
        )
    return None


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code the CLI ends with for ``exc`` (70 for a bug)."""
    error = as_job_error(exc)
    return ExitCode.INTERNAL if error is None else error.exit_code


# gloo reports a peer that died as a plain RuntimeError with one of these; NCCL and the c10d store
# raise torch.distributed.DistError subclasses.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer")


def _lost_peer(exc: BaseException) -> bool:
    """A collective failed because another process (another node) is gone: the group must restart."""
    torch = sys.modules.get("torch")  # only a run that imported torch can have lost a peer
    if torch is not None and isinstance(exc, torch.distributed.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in PEER_LOST)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]

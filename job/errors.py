"""The exit-code contract with Slurm, Kubernetes and the person on call, and the errors that carry it.

| code | meaning | what to do | Helm podFailurePolicy | Slurm script |
|---|---|---|---|---|
| 0 | done | | | |
| 1 | bad input data or an unusable environment | fix the data | FailJob | fail |
| 2 | a bad flag or config value | fix the command | FailJob | fail |
| 70 | an internal error (a bug) | report it | counts against backoffLimit | requeue, bounded |
| 75 | try again: preempted after a checkpoint, or an outage past the retries | rerun | Ignore | requeue |

Every non-zero exit prints exactly one line on stderr (``Error: ...``) and logs one event.
"""

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

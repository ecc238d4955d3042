"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class JobError(RuntimeError):
    """Bad input or an unusable environment; ``str(error)`` is one line naming what is wrong."""

    exit_code = 1


class ConfigError(JobError, ValueError):
    """A configuration value that cannot work; the message names the field or flag."""

    exit_code = 2

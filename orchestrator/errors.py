"""What can go wrong, in two kinds: what the user can fix (a `UserError`: one line that names the
field and the fix) and anything else (a bug). `orchestrator.cli.run_command` prints both."""


class UserError(Exception):
    """Bad input the user can fix; the message is one line naming the key and the fix."""
    exit_status = 2


class ConfigError(UserError):
    """A flag, run config or study file that cannot be used."""


class DataError(UserError):
    """A dataset that is missing, unreadable or malformed."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used, or an earlier run's that would be replaced."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite (the recipe's fault, most often the learning rate)."""


class TrackingError(UserError):
    """The MLflow tracking store cannot be used."""


class ReportError(UserError):
    """Runs or a CSV that a report cannot be made from."""


class OutOfMemory(UserError):
    """The run does not fit in the GPU memory it was given; the message says what to lower."""
    exit_status = 3


def shown(value, limit: int = 60) -> str:
    """A value as an error line quotes it: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text):,} characters)"

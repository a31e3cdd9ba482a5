"""What can go wrong, in two kinds: what the user can fix (a `UserError`: one line that names the
field and the fix) and anything else (a bug). `orchestrator.commands.cli.run_command` prints both.
SIGTERM (what `ray job stop`, Kubernetes and batch schedulers send) takes the Ctrl-C path
(`sigterm_as_ctrl_c`), and the command exits 143 instead of 130."""
import signal
import threading

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
_terminated = threading.Event()
_stop_asked = threading.Event()  # a Ctrl-C or SIGTERM reached this command


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


def short(value: object, limit: int = 120) -> str:
    """A value (a path, a flag, a cell) as an error line quotes it: its text, cut to `limit`
    characters and then its length. The one helper for this: pass repr(value) to quote it."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text):,} characters)"


class StorageError(UserError):
    """A place to write to that cannot be written: a file where a folder goes, read-only,
    missing, or full."""


class TrialsFailed(UserError):
    """Trials of a study that did not train (each one's reason is printed above); running the
    same command again trains exactly those."""
    exit_status = 4


class Busy(UserError):
    """The study is being run by another process right now."""


def sigterm_as_ctrl_c(fresh: bool = False):
    """From now on SIGTERM does what Ctrl-C does at that moment: it calls the current SIGINT
    handler (Tune's graceful stop during a sweep, else KeyboardInterrupt), and the command's exit
    status becomes 143. Called again after a library (Ray) installs its own SIGTERM handler.
    Signal handlers belong to the main thread; elsewhere this does nothing. `fresh`: a new
    command, no SIGTERM seen yet. Returns the handler it replaced (None off the main thread)."""
    if fresh:
        _terminated.clear()
        _stop_asked.clear()
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _as_ctrl_c)
    return None


def _as_ctrl_c(signum, frame) -> None:
    _terminated.set()
    _stop_asked.set()
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


class _Noted:
    """A SIGINT handler that notes the stop, then runs the handler it wraps."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, signum, frame) -> None:
        _stop_asked.set()
        if callable(self.inner):
            self.inner(signum, frame)
        elif self.inner != signal.SIG_IGN:
            raise KeyboardInterrupt


def note_ctrl_c() -> None:
    """From now on a Ctrl-C is noted (`stop_asked`) before the SIGINT handler installed now runs.
    Tune installs its own as a fit starts, and its graceful stop returns as if the study had
    ended; a callback of the fit calls this. Main thread only; never wraps twice."""
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread() and not isinstance(handler, _Noted):
        signal.signal(signal.SIGINT, _Noted(handler))


def stop_asked() -> bool:
    """Whether a Ctrl-C (seen since `note_ctrl_c`) or a SIGTERM reached this command."""
    return _stop_asked.is_set()


def interrupted_status() -> int:
    """130 after Ctrl-C, 143 after SIGTERM."""
    return EXIT_TERMINATED if _terminated.is_set() else EXIT_INTERRUPTED

"""What every command shares: one error convention, logging, and the common flags.

A command module imports only this and argparse at the top; `run_command` parses its flags, then
loads the heavy libraries (torch, Ray, MLflow: the command's `preload`), then runs its work. So
`--help` answers at once, and Ctrl-C while the libraries load ends at once in one line (nothing
has started yet; an interrupt inside an import is otherwise swallowed by some libraries, or
leaves them half initialised).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Protocol

from orchestrator.errors import (EXIT_INTERRUPTED, UserError, interrupted_status, short,
                                 sigterm_as_ctrl_c)
from orchestrator.storage import os_error_line

EXIT_INTERNAL = 1
MAX_ERROR_LINE = 1000  # characters; a message quoting a huge value keeps its start and its fix


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a redirected or captured stream)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(_Plain())

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class _Plain(logging.Formatter):
    """Info as the message alone; warnings and errors prefixed as `warning: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else \
            f"{record.levelname.lower()}: {message}"


def setup_logging(verbose: bool = False) -> None:
    """The project's diagnostics (logger `orchestrator`) on stderr; debug lines with verbose."""
    logger = logging.getLogger("orchestrator")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def invoked_as(name: str) -> str:
    """The command `name` as it was started, for its usage line: `python -m orchestrator.<name>`
    (or `orchestrator.commands.<name>`) run as a module, the console script's own name
    (`multires-<name>`), else (`main` called from Python) the `python -m` form."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name in (f"orchestrator.{name}", f"orchestrator.commands.{name}"):
        return f"python -m {spec.name}"
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return script if script == f"multires-{name}" else f"python -m orchestrator.{name}"


def add_common_flags(parser: argparse._ActionsContainer) -> None:  # a parser or a group of it
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")


Work = Callable[[argparse.Namespace], int | None]
Advice = Callable[[argparse.Namespace], str] | str  # what to do after Ctrl-C
Preload = Callable[[argparse.Namespace], Iterable[str]] | Iterable[str]  # modules to import


def run_command(parser: argparse.ArgumentParser, work: Work, argv: list[str] | None = None,
                interrupted: Advice = "interrupted", preload: Preload = ()) -> int:
    """Parse argv, import the `preload` modules, run the command's work and return its exit
    status: 0 (or what work returns); for a `UserError`, its one line and its status (2, or 3
    for out of GPU memory); an OSError of a place (no space left, read-only, ...) is one too;
    for Ctrl-C, the `interrupted` advice and 130 (SIGTERM: the same, and 143); for anything
    else (a bug), "internal error", where the traceback was written, and 1. With --debug,
    errors raise with their traceback."""
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    advice = (lambda: interrupted(args)) if callable(interrupted) else (lambda: interrupted)
    setup_logging()
    sigterm = sigterm_as_ctrl_c(fresh=True)
    try:
        _load(lambda: preload(args) if callable(preload) else preload, advice)
        status = work(args) or 0
        return interrupted_status() if status == EXIT_INTERRUPTED else status
    except KeyboardInterrupt:
        print(advice(), file=sys.stderr)
        return interrupted_status()
    except UserError as exc:
        if debug:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_status
    except (OSError, RuntimeError) as exc:
        line = os_error_line(exc, anywhere=True)
        if debug or line is None:
            return _internal(exc, debug)
        print(f"error: {one_line(line)}", file=sys.stderr)
        return UserError.exit_status
    except Exception as exc:
        return _internal(exc, debug)
    finally:
        if sigterm is not None:  # the caller's own handler again (a test session's)
            signal.signal(signal.SIGTERM, sigterm)


def _internal(exc: Exception, debug: bool) -> int:
    """A bug: one line, and the traceback in a file."""
    if debug:
        raise exc
    with tempfile.NamedTemporaryFile("w", prefix="multires-traceback-", suffix=".txt",
                                     delete=False) as f:
        traceback.print_exc(file=f)
    first_line = one_line((str(exc).strip().splitlines() or [""])[0])
    print(f"internal error: {type(exc).__name__}: {first_line}\n(a bug, not your input: the "
          f"traceback is in {f.name}; please report it)", file=sys.stderr)
    return EXIT_INTERNAL


def one_line(text: str) -> str:
    """An error message as one line of at most MAX_ERROR_LINE characters."""
    text = " ".join(text.split("\n"))
    if len(text) <= MAX_ERROR_LINE:
        return text
    half = MAX_ERROR_LINE // 2
    return f"{text[:half]} [... {len(text) - 2 * half:,} characters ...] {text[-half:]}"


def _load(modules: Callable[[], Iterable[str]], advice: Callable[[], str]) -> None:
    """Import the `modules` (what a command checks before them, such as its study file, runs
    first); Ctrl-C meanwhile prints the advice and exits at once (130)."""
    def quit_now(signum, frame):
        print(advice(), file=sys.stderr, flush=True)
        os._exit(interrupted_status())

    # Signal handlers belong to the main thread (a command run from another thread just loads).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, quit_now) if main_thread else None
    try:
        for module in modules():
            importlib.import_module(module)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


class Main(Protocol):
    def __call__(self, argv: list[str] | None = None) -> int: ...


def command(parser: Callable[[], argparse.ArgumentParser], work: Work,
            interrupted: Advice = "interrupted", preload: Preload = ()) -> Main:
    """A command's `main(argv=None) -> exit status`, through `run_command`."""
    def main(argv: list[str] | None = None) -> int:
        return run_command(parser(), work, argv, interrupted, preload)
    return main


def parse_blocks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 4,4,3, "
                                         f"got {short(repr(text), 60)}") from None


ARCHITECTURE_FLAGS = ("depth", "k", "width", "block", "blocks", "shortcut")


def add_architecture_flags(parser) -> None:
    """The architecture flags of orchestrator.train and orchestrator.summary."""
    parser.add_argument("--depth", type=int, help="layers along one function (6n+2 basic, 9n+2 "
                        "bottleneck on CIFAR; 18/34/50/101/152/200 on ImageNet)")
    parser.add_argument("--k", type=int, help="residual functions per block (default 1)")
    parser.add_argument("--width", type=int, help="widening factor w (default 1)")
    parser.add_argument("--block", choices=["basic", "bottleneck"])
    parser.add_argument("--blocks", type=parse_blocks, help="blocks per stage, e.g. 4,4,3")
    parser.add_argument("--shortcut", choices=["A", "B"])


def architecture_fields(args: argparse.Namespace) -> dict:
    return {n: getattr(args, n) for n in ARCHITECTURE_FLAGS if getattr(args, n, None) is not None}

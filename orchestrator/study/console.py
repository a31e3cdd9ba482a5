"""What a person sees while a study runs: one line when it starts, a live table of the running
trials (tqdm: epoch progress, current and best test error, the study's time left), one line per
finished trial, then the summary. Ray's own output (its logs, Tune's tables, the workers' lines)
goes to a log file in the results folder; `--verbose` shows it on the console instead."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from ray.tune import Callback
from tqdm import tqdm

from orchestrator.compat import RAY_WORKER, resolve
from orchestrator.errors import note_ctrl_c
from orchestrator.results import DIVERGED, outcome

RAY_LOG = "ray.log"
NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"
_console = None  # the console's stderr while Ray's output goes to the log: for the bars
_ray_lines = None  # where the lines that Ray forwards go (see _route_ray_lines)


def to_console(line: str) -> None:
    """A line for the user's terminal (stderr), also while Ray's output goes to the log."""
    print(line, file=_console or sys.stderr, flush=True)


@contextlib.contextmanager
def ray_output_to(log_path: Path):
    """While the study runs, what the libraries write goes to `log_path`: Ray's loggers and
    C++ logs (this process's file descriptors 1 and 2), anything written to sys.stderr (Ray's
    error messages, MLflow's and Optuna's loggers, warnings), and the lines Ray forwards from the
    workers and the raylet. sys.stdout, the project's logger `orchestrator` and the progress bars
    stay on the console."""
    global _console
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    # A stream that is this process's own fd (a terminal or a pipe) is re-opened on a copy of
    # that fd; one that is not (a test's capture) is kept as it is.
    out, err = (_reopened(stream, fd) for stream, fd in zip(streams, saved))
    # Left open: loggers set up during the study (Optuna's) keep writing to it afterwards.
    log = open(log_path, "a", buffering=1)
    project = logging.getLogger("orchestrator")
    handlers = project.handlers[:]
    legacy_output = os.environ.get(NEW_OUTPUT)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout, sys.stderr = out, log
    if handlers:
        project.handlers = [logging.StreamHandler(err)]
        project.handlers[0].setFormatter(handlers[0].formatter)
    # Tune's newer output engine prints its header whatever the verbosity; the older one prints
    # nothing at verbosity 0.
    os.environ[NEW_OUTPUT] = "0"
    _route_ray_lines(log)
    _console = err
    try:
        yield
    finally:
        _console = None
        if legacy_output is None:
            os.environ.pop(NEW_OUTPUT, None)
        else:
            os.environ[NEW_OUTPUT] = legacy_output
        project.handlers = handlers
        for stream in (out, err, log):
            stream.flush()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _route_ray_lines(log) -> None:
    """What Ray forwards (the workers' and the raylet's lines) goes to `log`, from now until this
    process ends: the study's actors still print as they stop, after the study returned.
    (Private: `print_worker_logs` is the one function Ray prints them through.)"""
    ray_worker = resolve(RAY_WORKER)

    global _ray_lines
    if _ray_lines is None:
        original = ray_worker.print_worker_logs
        ray_worker.print_worker_logs = lambda data, _, ignore_prefix=False: original(
            data, _ray_lines, ignore_prefix)
    _ray_lines = log


def _reopened(stream, fd: int):
    try:
        own = stream.fileno() in (1, 2)
    except (AttributeError, OSError, ValueError):
        own = False
    if not own:
        return stream
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=stream.encoding, errors="replace")


def start_line(study, trials: int, at_once: int, results: str, ray_log: Path | None) -> str:
    res = study.resources
    each = f"{res.workers} worker{'s' * (res.workers > 1)} x {res.cpus_per_worker:g} CPU"
    if res.gpus_per_worker:
        each += f" + {res.gpus_per_worker:g} GPU"
    log = f"; Ray's log: {ray_log}" if ray_log else ""
    return (f"study {study.name}: up to {trials} trials, {at_once} at a time, each {each}; "
            f"MLflow: {study.tracking_uri()} (experiment '{study.experiment_name}'); results: "
            f"{results}{log}")


class StudyProgress(Callback):
    """A Tune callback: one bar for the study (epochs trained of those planned, time left) and
    one per running trial; a line when a trial ends. Bars show on a terminal only; logs and
    pipes get the lines."""

    def __init__(self, study, trials: int):
        self.study, self.epochs, self.trials = study, study.train.epochs, trials
        self.study_bar = None
        self.bars: dict[str, tqdm] = {}
        self.best: float | None = None

    def __reduce__(self):  # bars are this process's: a restored study draws new ones
        return StudyProgress, (self.study, self.trials)

    def name_of(self, trial) -> str:
        return trial.custom_trial_name or self.study.trial_name(trial.config)

    def epochs_of(self, trial) -> int:
        """Its schedule's epochs: a short one (the n0 searcher's `fidelity`) or the full one."""
        fidelity = (trial.config or {}).get("fidelity", 1.0)
        return max(1, round(fidelity * self.epochs))

    def _study_bar(self) -> tqdm:
        if self.study_bar is None:
            # Bars only while Ray's output goes to the log (with --verbose it would cut them).
            self.study_bar = tqdm(total=self.epochs * self.trials, position=0, leave=False,
                                  desc=self.study.name, file=_console or sys.stderr,
                                  disable=None if _console else True,
                                  bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} epochs "
                                             "[{elapsed}, {remaining} left]{postfix}")
        return self.study_bar

    def on_step_begin(self, iteration, trials, **info):
        # The user's Ctrl-C is noted once Tune's own handler is set (a restored study's
        # callbacks are this class's code too: the note holds for a study begun before it).
        note_ctrl_c()

    def on_trial_start(self, iteration, trials, trial, **info):
        study_bar = self._study_bar()
        taken = {bar.slot for bar in self.bars.values()}
        slot = min(set(range(1, len(self.bars) + 2)) - taken)
        self.bars[trial.trial_id] = tqdm(
            total=self.epochs_of(trial), position=slot, desc=self.name_of(trial), leave=False,
            file=_console or sys.stderr, disable=study_bar.disable,
            bar_format="  {desc} {bar:10} {n_fmt}/{total_fmt}{postfix}")
        self.bars[trial.trial_id].slot = slot

    def on_trial_result(self, iteration, trials, trial, result, **info):
        bar = self.bars.get(trial.trial_id)
        if bar is None or "epoch" not in result:
            return
        bar.update(result["epoch"] - bar.n)
        self._study_bar().update(1)
        best = result.get("best_test_error")
        if best is not None:
            bar.set_postfix_str(f"test error {result['test_error']:.3f} (best {best:.3f})")
        if best is not None and (self.best is None or best < self.best):
            self.best = best
            self._study_bar().set_postfix_str(f"best test error {best:.3f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, errored=True)

    def _end(self, trial, errored: bool) -> None:
        bar = self.bars.pop(trial.trial_id, None)
        if bar is not None:
            bar.close()
        result = trial.last_result or {}
        epochs = result.get("epoch", 0)
        study_bar = self._study_bar()
        study_bar.total -= self.epochs - epochs  # stopped early or short: not coming
        study_bar.refresh()
        planned = self.epochs_of(trial)
        short = "" if planned == self.epochs else " (short schedule)"
        line = (f"{outcome(result, errored):8} {self.name_of(trial)}  {epochs}/{planned} "
                f"epochs{short}")
        if result.get(DIVERGED):
            line += f"  {result[DIVERGED]}"
        elif result.get("best_test_error") is not None:
            line += f"  test error {result['test_error']:.3f} (best " \
                    f"{result['best_test_error']:.3f})  {result.get('time_total_s', 0):.0f} s"
        # Above the bars where they show (tqdm clears and redraws them), else on stdout.
        tqdm.write(line, file=sys.stdout if study_bar.disable else _console)

    def on_experiment_end(self, trials, **info):
        for bar in self.bars.values():
            bar.close()
        if self.study_bar is not None:
            self.study_bar.close()

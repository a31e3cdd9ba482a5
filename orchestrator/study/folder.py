"""A study's results folder: its state file (what was trained, under which parent run), the
lock that keeps a second sweep out, where this machine keeps the study's files, and the paths
a study resolves (and the dataset it fetches) before any trial starts."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import Busy, ConfigError, short
from orchestrator.run.data import DATASETS, load_dataset
from orchestrator.storage import check_regular, is_remote, join, read_text, resolve, shown
from orchestrator.study.config import StudyConfig

STATE_FILE = "multires_study.json"
LOCK_FILE = ".multires.lock"


def resolve_paths(study: StudyConfig, fetch: bool = True) -> StudyConfig:
    """Make every path absolute (trials run in other folders, or on other machines) and fetch
    the dataset once, before any trial starts (`fetch`; the dry run does not)."""
    train = study.train
    if DATASETS[train.dataset].needs_files:
        data_dir = str(resolve(train.data_dir or "data", "--data-dir"))
        if fetch:  # downloads when absent and online; checks the files, sizes and classes
            images = len(load_dataset(train.dataset, data_dir, train.train_size,
                                      train.test_size, train.seed)[0])
            batch = max(study.trial_config(sampled).batch_size
                        for sampled in _batch_choices(study))
            if images < batch:  # as orchestrator.train says, before any trial starts
                raise ConfigError(f"train_size {images} is smaller than one batch ({batch}); "
                                  f"raise train_size or lower batch_size")
        train = train.model_copy(update={"data_dir": data_dir})
    mlflow = study.mlflow.model_copy(update={"tracking_uri": study.tracking_uri()})
    return study.model_copy(update={"train": train, "mlflow": mlflow,
                                    "storage_path": study.storage()})


def _batch_choices(study: StudyConfig) -> list[dict]:
    """A sampled trial at each end of the study's batch sizes (one when it is fixed)."""
    dist = study.searched().get("batch_size")
    values = getattr(dist, "choices", None) or [getattr(dist, "low", None),
                                                getattr(dist, "high", None)]
    return [{"batch_size": v} for v in values if v is not None] or [{}]


def config_hash(study: StudyConfig) -> str:
    return hashlib.sha256(json.dumps(study.model_dump(mode="json"), sort_keys=True).encode()
                          ).hexdigest()[:16]


class StudyState(BaseModel):
    """What a results folder's multires_study.json holds (read back: checked, never trusted)."""
    model_config = ConfigDict(extra="ignore", strict=True)
    # MLflow's run ids are hex; the id goes into search filters, so no quote gets in.
    parent_run_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    config_hash: str = Field(pattern=r"^[0-9a-f]{16}$")
    tracking_uri: str = Field(max_length=4096)
    experiment: str = Field(max_length=4096)
    config: dict | None = None  # what was trained (an extension is checked against it)


def read_state(results: str) -> dict | None:
    """The study's own state in its results folder (local or a storage URI), None if absent."""
    place = join(results, STATE_FILE)
    fix = f"remove {shown(results)} to start the study again"
    try:
        text = read_text(place, fix=fix)
        return None if text is None else StudyState.model_validate_json(text).model_dump()
    except (ValueError, ValidationError):  # not UTF-8, not JSON, not the fields
        raise ConfigError(f"{shown(place)} is not a study's state (truncated or edited); "
                          f"{fix}") from None


def local_folder(study: StudyConfig) -> Path:
    """Where this machine keeps the study's own files (Ray's log, the report, the lock): its
    results folder, or for remote storage a folder in the temporary directory."""
    results = study.results_place()
    return Path(tempfile.gettempdir(), "multires", study.name) if is_remote(results) else \
        Path(results)


@contextlib.contextmanager
def study_lock(folder: Path, study: StudyConfig):
    """One sweep of a study at a time on a results folder: a second one is refused, not mixed
    in. (With remote storage the lock is this machine's only.)"""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / LOCK_FILE).exists():  # read back below: a pipe would block, a device not lock
        check_regular(folder / LOCK_FILE, "storage_path", fix="remove it")
    with open(folder / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = short(lock.read(64).strip() or "?", 20)
            raise Busy(f"study {study.name} is running in another process (pid {holder}) on "
                       f"{shown(study.results_place())}; wait for it to end, or use another "
                       f"--storage-path") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield

"""The private Ray and MLflow names this project uses, in one place. Each is used where no public
API does the same (said beside it); `tests/test_compat.py` resolves every one, so an upgrade that
moves or renames one fails there, naming it, instead of somewhere in a running study.

Names are "module:attribute" and resolved when used: the layers that use them import Ray or MLflow
anyway, and a study file is validated without loading either."""
from __future__ import annotations

import importlib
from typing import Any

# The steps of Ray Train's torch backend that run on the workers, reused by the project's own
# backend (cluster.driver: the process group's store binds where the ranks are, which ray.train's
# public TorchConfig cannot set). Resolved on the workers: their module imports torch.
TORCH_DISTRIBUTED_ENV = "ray.train.torch.config:_set_torch_distributed_env_vars"
TORCH_SHUTDOWN = "ray.train.torch.config:_shutdown_torch"
TORCH_TRAIN_CONTEXT = "ray.train.torch.config:TorchConfigContextManager"
# What Ray Train's run state (its dashboard, state export) calls the framework of a backend.
TRAINING_FRAMEWORK = "ray.train.v2._internal.util:TrainingFramework"
# A placement group from its hex id, to remove a finished job's groups (the public
# PlacementGroup takes an id object, and only this class makes one from hex).
PLACEMENT_GROUP_ID = "ray._raylet:PlacementGroupID"
# Read when Ray starts a local node: off keeps its servers on loopback for a private instance.
RAY_CONSTANTS = "ray._private.ray_constants:"
# The one function through which Ray prints the workers' and the raylet's lines (to ray.log).
RAY_WORKER = "ray._private.worker:"
# Tune's copy of its state to the storage path, routed through the signing (trust.signing): no
# public hook sees each file before it lands.
FILESYSTEM_SYNCER = "ray.train._internal.storage:_FilesystemSyncer"
# The name rules MLflow applies to experiments and registered models, checked before Ray starts.
VALIDATE_EXPERIMENT_NAME = "mlflow.utils.validation:_validate_experiment_name"
VALIDATE_MODEL_NAME = "mlflow.utils.validation:_validate_model_name"
# The schema revision MLflow migrates a new database to: the tests wait for it before they read a
# sqlite database that a sweep is creating (a reader that finds it unfinished migrates it too).
MLFLOW_SCHEMA_HEAD = "mlflow.store.db.utils:_get_latest_schema_revision"

PRIVATE = {
    TORCH_DISTRIBUTED_ENV: "__call__",
    TORCH_SHUTDOWN: "__call__",
    TORCH_TRAIN_CONTEXT: "__enter__",
    TRAINING_FRAMEWORK: "TORCH",
    PLACEMENT_GROUP_ID: "from_hex",
    RAY_CONSTANTS: "ENABLE_RAY_CLUSTER",
    RAY_WORKER: "print_worker_logs",
    FILESYSTEM_SYNCER: "_sync_up_command",
    VALIDATE_EXPERIMENT_NAME: "__call__",
    VALIDATE_MODEL_NAME: "__call__",
    MLFLOW_SCHEMA_HEAD: "__call__",
}  # each name -> an attribute that the project uses on it


def resolve(name: str) -> Any:
    """The object a "module:attribute" name stands for (the module itself for "module:")."""
    module, _, attribute = name.partition(":")
    found = importlib.import_module(module)
    return getattr(found, attribute) if attribute else found

import atexit
import os
import pickle
import secrets
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Sweeps sign Ray's state in their results folders with this key instead of the user's key
# file (~/.config/multires/state.key): tests leave nothing in the home folder.
os.environ.setdefault("MULTIRES_STATE_KEY", "test key, not secret")
# The local Ray instances they start take their token from here, not from ~/.ray/auth_token
# (which Ray writes where there is none).
if not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):
    _ray_token = Path(tempfile.mkdtemp(prefix="multires-tests-")) / "auth_token"
    _ray_token.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_ray_token)
    atexit.register(shutil.rmtree, _ray_token.parent, True)


def real_cifar10_dir() -> Path | None:
    """The folder holding cifar-10-batches-py/, from MULTIRES_CIFAR10_DIR (set by .ci/run)."""
    path = os.environ.get("MULTIRES_CIFAR10_DIR")
    if path and (Path(path) / "cifar-10-batches-py" / "data_batch_1").is_file():
        return Path(path)
    return None


@pytest.fixture
def cifar10_dir() -> Path:
    path = real_cifar10_dir()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("MULTIRES_CIFAR10_DIR must point at real CIFAR-10 in CI")
        pytest.skip("real CIFAR-10 not available: set MULTIRES_CIFAR10_DIR")
    return path


def write_cifar_layout(root: Path, name: str, train: int = 200, test: int = 100,
                       seed: int = 0) -> Path:
    """Synthetic files in the standard python layout (the official CIFAR-100 format: a dict
    with byte-string keys, as Python 2 pickled it)."""
    rng = np.random.default_rng(seed)
    if name == "cifar100":
        folder, files, key, classes = root / "cifar-100-python", {"train": train, "test": test}, \
            b"fine_labels", 100
    else:
        per = train // 5
        folder, key, classes = root / "cifar-10-batches-py", b"labels", 10
        files = {**{f"data_batch_{i}": per for i in range(1, 6)}, "test_batch": test}
    folder.mkdir(parents=True)
    for fname, n in files.items():
        record = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                  key: rng.integers(0, classes, n).tolist()}
        if name == "cifar100":
            record[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
        with open(folder / fname, "wb") as f:
            pickle.dump(record, f, protocol=2)
    return folder


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance (2 CPUs, loopback) for the whole test run."""
    import ray

    from orchestrator.cluster.driver import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    sigterm = signal.getsignal(signal.SIGTERM)
    init_ray(num_cpus=2)  # as the commands start it
    # Its processes know its address; the tests' own commands are given it where they use it.
    os.environ.pop("RAY_ADDRESS", None)
    signal.signal(signal.SIGTERM, sigterm)  # the commands' SIGTERM handler is theirs, not the session's
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def checkout_left_as_it_was():
    """No test writes into the checkout (a sweep's default results/ and mlflow.db, MLflow's
    ./mlruns of an experiment made without a place): each test keeps to its own folder."""
    root = Path(__file__).parent.parent
    names = ("results", "mlflow.db", "mlruns", "mlartifacts")
    before = {name for name in names if (root / name).exists()}
    yield
    made = sorted({name for name in names if (root / name).exists()} - before)
    assert not made, f"the tests wrote {made} into the checkout"


@pytest.fixture
def in_empty_folder(tmp_path, monkeypatch) -> None:
    """Start the test in an empty folder: a sweep's default results/ and mlflow.db are in the
    starting folder, and a test that relies on them must not read a study the user ran in the
    checkout (the README's smoke study)."""
    monkeypatch.chdir(tmp_path)


SLOW_FIXTURES = {"ray_address", "cluster", "cifar10_dir"}


def pytest_collection_modifyitems(items):
    """What starts Ray, a cluster or servers, or trains on real data, is `slow`: the inner loop
    is `python -m pytest -m "not slow"`; the README's command still runs everything."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

"""Every private Ray or MLflow name the project uses still exists, with what is used on it: an
upgrade that moves one fails here, by name."""
import pytest

from orchestrator import compat


@pytest.mark.parametrize("name", sorted(compat.PRIVATE))
def test_each_private_name_resolves(name):
    assert hasattr(compat.resolve(name), compat.PRIVATE[name]), \
        f"{name} has no {compat.PRIVATE[name]}: the upgrade moved it; see orchestrator/compat.py"


def test_a_moved_name_is_noticed():
    with pytest.raises(AttributeError):
        compat.resolve("ray._private.worker:no_such_function")


def test_a_database_mid_migration_is_not_read_by_the_tests(tmp_path):
    """The tests read a sweep's sqlite database only once its schema is MLflow's last revision
    (alembic records each revision as it migrates; a reader that came earlier migrated too, and
    the sweep's own migration then failed)."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from tests.sweeps import made

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert not made(uri)  # no file yet
    (tmp_path / "mlflow.db").touch()
    assert not made(uri)  # no tables yet
    MlflowClient(uri).search_experiments()
    assert made(uri)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("update alembic_version set version_num = 'an earlier revision'")
    assert not made(uri)

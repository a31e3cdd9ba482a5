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

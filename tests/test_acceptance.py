"""The GPU acceptance run (bench/gpu_acceptance.sh) on this CPU with DRY=1: its steps run end
to end in the current environment, a missing dependency stops it at the step that needs it
(non-zero exit, the step named), and the wheelhouse it installs lists what a GPU image lacks."""
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


def acceptance(tmp_path, steps: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY": "1", "STEPS": steps, "TMPDIR": str(tmp_path), **env}
    return subprocess.run(["bash", "bench/gpu_acceptance.sh", "", str(tmp_path / "r.tgz")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_a_missing_dependency_stops_the_run_at_its_step(tmp_path):
    fake = tmp_path / "site" / "pydantic"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named pydantic')\n")
    run = acceptance(tmp_path, "install deps mesh",
                     PYTHONPATH=f"{tmp_path / 'site'}:{os.environ.get('PYTHONPATH', REPO)}")
    assert run.returncode != 0
    assert "gpu_acceptance: step deps failed" in run.stderr and "pydantic" in run.stderr
    assert "== mesh" not in run.stdout  # nothing after the failed step
    with tarfile.open(tmp_path / "r.tgz") as tar:  # what ran is kept
        assert {"results/install.log", "results/deps.log"} <= set(tar.getnames())


@pytest.mark.slow  # two ranks and a JPEG folder on CPU: about a minute on two cores
def test_dry_mesh_and_decode_steps_pass_on_cpu(tmp_path):
    run = acceptance(tmp_path, "install deps mesh decode")
    assert run.returncode == 0, run.stderr[-2000:]
    with tarfile.open(tmp_path / "r.tgz") as tar:
        logs = {name: tar.extractfile(name).read().decode() for name in tar.getnames()
                if name.endswith(".log")}
    assert '"check": "mesh"' in logs["results/mesh.log"] and '"ok": true' in logs["results/mesh.log"]
    assert '"bit_identical"' in logs["results/decode.log"] and '"ok": true' in logs["results/decode.log"]
    assert not list(tmp_path.glob("gpu-acceptance.*"))  # scratch removed


def test_the_wheelhouse_holds_the_dependencies_a_gpu_image_lacks():
    listing = subprocess.run(["bash", "bench/wheelhouse.sh", "--list"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    names = {line.split("[")[0].split(">")[0] for line in listing if not line.startswith("#")}
    assert {"pydantic", "ray", "mlflow", "optuna"} <= names
    assert not {"torch", "torchvision"} & names
    assert "--python-version 3.12" in listing[-1] and "--only-binary=:all:" in listing[-1]

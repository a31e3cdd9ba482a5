"""The folders are layers: each imports only the layers below it (the package docstrings say
which), so that models stay plain modules, a single run needs no Ray, and the analysis no MLflow.
Checked on every import statement, those inside functions included."""
import ast
import re
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BASE = {"orchestrator.errors", "orchestrator.results", "orchestrator.storage", "orchestrator.compat",
        "orchestrator.costs"}
SHIMS = ("train", "sweep", "report", "lesion", "summary")
# package -> the project packages (and modules) it may import, besides itself
ALLOWED = {
    "models": set(),
    "orchestrator.errors": set(),
    "orchestrator.results": set(),
    "orchestrator.compat": set(),
    "orchestrator.costs": {"orchestrator.results"},
    "orchestrator.storage": {"orchestrator.errors"},
    "orchestrator.trust": {"orchestrator.errors", "orchestrator.storage", "orchestrator.compat"},
    "orchestrator.parallel": {"models"} | BASE,
    "orchestrator.run": {"models", "orchestrator.parallel"} | BASE,
    "orchestrator.analysis": {"models", "orchestrator.run"} | BASE,
    "orchestrator.cluster": {"models", "orchestrator.parallel", "orchestrator.run"} | BASE,
    "orchestrator.study": {"models", "orchestrator.parallel", "orchestrator.run",
                           "orchestrator.analysis", "orchestrator.cluster",
                           "orchestrator.trust"} | BASE,
    "orchestrator.commands": {"models", "orchestrator"},  # the commands sit on top
    "orchestrator.commands.cli": BASE,
    # `python -m orchestrator.sweep` and the others, as the docs write them
    **{f"orchestrator.{name}": {"orchestrator.commands"} for name in SHIMS},
}
# Libraries a layer must not need: a single run trains without Ray, MLflow or Optuna.
FORBIDDEN = {
    "models": {"ray", "mlflow", "optuna", "orchestrator", "argparse"},
    "orchestrator.parallel": {"ray", "mlflow", "optuna"},
    "orchestrator.run": {"ray", "mlflow", "optuna"},
    "orchestrator.analysis": {"ray", "mlflow", "optuna"},
    "orchestrator.cluster": {"mlflow", "optuna", "ray.tune"},
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer(name: str) -> str | None:
    return next((key for key in sorted(ALLOWED, key=len, reverse=True)
                 if name == key or name.startswith(key + ".")), None)


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append(node.module)
    return found


MODULES = sorted(p for folder in ("models", "orchestrator") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_each_module_imports_only_the_layers_below_it(path):
    name = module_name(path)
    if name == "orchestrator":
        return
    own = layer(name)
    assert own is not None, f"{name} belongs to no layer; add it to ALLOWED"
    allowed = ALLOWED[own] | {own}
    for target in imports(path):
        root = target.split(".")[0]
        if root in ("models", "orchestrator"):
            assert any(target == a or target.startswith(a + ".") for a in allowed), \
                f"{name} imports {target}, which its layer ({own}) may not"
        for banned in FORBIDDEN.get(own, ()):
            assert not (target == banned or target.startswith(banned + ".")), \
                f"{name} imports {target}; the {own} layer must not need {banned}"


def test_every_package_says_what_it_may_import():
    for init in sorted((ROOT / "orchestrator").rglob("__init__.py")):
        text = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in text, f"{init.relative_to(ROOT)}: say what the package may import"


def test_study_and_run_files_validate_without_torch():
    """Config I/O sits at the base: a study's schema, pairs and budget are checked without
    torch, so `--dry-run`'s first lines and every bad-input line come before it loads."""
    code = ("import sys; from orchestrator.study.config import load_study; "
            "load_study('search_spaces/depth_vs_k.yaml'); import orchestrator.run.config; "
            "print(sorted(m for m in ('torch', 'torchvision', 'PIL', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_trials_driver_and_ray_trains_controller_load_no_torch(tmp_path):
    """Each trial starts its driver and Ray Train's controller as new processes: they load the
    driver module, resolve the trial's run and build its trainer without torch (about 3 CPU-s a
    process to import; on Linux, where the CPU's bf16 is read from the kernel's flags). The
    training loop loads only in the run's workers, and torchvision (with torch's compiler, which
    torchvision imports) only where an image folder or a download needs it."""
    code = ("import sys; from orchestrator.study.config import load_study; "
            "import orchestrator.study.trainable; "
            "from orchestrator.cluster.driver import build_trainer; "
            "s = load_study('search_spaces/smoke.yaml'); "
            "run = s.trial_config({'arch': s.feasible()[0].name, 'seed': 0, 'lr': 0.05}); "
            f"build_trainer(run, name='t', storage_path={str(tmp_path)!r}, echo=False); "
            "print(sorted(m for m in ('torch', 'torchvision', 'orchestrator.run.loop') "
            "if m in sys.modules)); "
            "import orchestrator.cluster.worker; print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    loaded = "[]" if kernel_lists_x86_flags() else "['torch']"
    assert out.stdout.split("\n")[:2] == [loaded, "False"], out.stdout + out.stderr


def kernel_lists_x86_flags() -> bool:
    try:
        return "\nflags" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_functions_are_short():
    """No function of the project over 60 lines: a long one is split into named steps."""
    long = [f"{module_name(path)}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in MODULES for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_every_module_has_a_row_in_the_map_of_tests():
    """docs/architecture.md maps each module to its tests: every module of models/ and
    orchestrator/ (but the package docstrings) is named there, and every name is a file."""
    text = (ROOT / "docs/architecture.md").read_text().split("## Where each module is tested")[1]
    named, tests = set(), set()
    for row in text.split("\n## ")[0].splitlines():
        cells = row.split("|")
        if len(cells) < 4 or not cells[1].strip().startswith("`"):
            continue
        folder = ""
        for token in re.findall(r"`([^`]+)`", cells[1]):
            if "/" in token:
                folder = token.rsplit("/", 1)[0]
            named.add(f"{folder}/{token.rsplit('/', 1)[-1]}")
        tests |= {t for t in re.findall(r"`([^`]+\.py)`", cells[2])}
    modules = {str(p.relative_to(ROOT)) for p in MODULES if p.name != "__init__.py"}
    assert not modules - named, f"modules with no row in docs/architecture.md: {modules - named}"
    assert not named - modules, f"rows naming no module: {named - modules}"
    missing = {t for t in tests if not (ROOT / "tests" / t).is_file()}
    assert not missing, f"test files the map names that do not exist: {missing}"


@pytest.mark.parametrize("tool, args", [("ruff", ["check", "."]), ("mypy", [])])
def test_the_linter_and_the_type_checker_find_nothing(tool, args):
    """`ruff check .` and `mypy` (configured in pyproject.toml, both run by .ci/run) are clean:
    a finding fails here, in the inner loop, with the tool's own lines."""
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed: pip install -e '.[dev]' brings it")
    out = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, f"{tool} {' '.join(args)}:\n{out.stdout}{out.stderr}"

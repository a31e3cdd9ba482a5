"""The front door: the README stays short, its commands name what exists, every docs page is
linked and every link resolves, and no sentence is kept in two homes (README, docs, docstrings)."""
import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_every_link_resolves_and_every_page_is_linked():
    linked = set()
    for page in [README, *DOCS]:
        for target, _ in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which is missing"
            linked.add(path)
    unlinked = [p.name for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"docs pages no page links to: {unlinked}"


def test_commands_name_what_exists():
    text = "\n".join(page.read_text() for page in [README, *DOCS])
    modules = set(re.findall(r"python -m (orchestrator\.\w+)", text))
    assert {"orchestrator.sweep", "orchestrator.train"} <= modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    for study in set(re.findall(r"search_spaces/\w+\.yaml", text)):
        assert (ROOT / study).is_file(), study


def test_every_command_has_a_console_script_and_a_python_m_form(tmp_path):
    """Each module of orchestrator/commands/ (but cli.py) is `multires-<name>` once installed
    and `python -m orchestrator.<name>` from a checkout; both reach the same `main`, and each
    names itself as it was started in its usage line."""
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    names = {p.stem for p in (ROOT / "orchestrator/commands").glob("*.py")} - {"__init__", "cli"}
    assert scripts == {f"multires-{n}": f"orchestrator.commands.{n}:main" for n in names}
    for name in sorted(names):
        assert callable(importlib.import_module(f"orchestrator.commands.{name}").main), name
        assert (ROOT / "orchestrator" / f"{name}.py").is_file(), f"orchestrator/{name}.py"
        out = subprocess.run([sys.executable, "-m", f"orchestrator.{name}", "--help"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith(f"usage: python -m orchestrator.{name} "), out[:200]
        script = console_script(tmp_path, f"multires-{name}", scripts[f"multires-{name}"])
        out = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                             text=True, check=True).stdout
        assert out.startswith(f"usage: multires-{name} "), out[:200]
    out = subprocess.run([sys.executable, "-m", "orchestrator.commands.sweep", "--bogus"],
                         cwd=ROOT, capture_output=True, text=True).stderr
    assert out.startswith("usage: python -m orchestrator.commands.sweep "), out[:200]


def console_script(folder: Path, name: str, entry_point: str) -> Path:
    """The launcher pip writes for a console script (`module:function`), as `folder/name`."""
    module, function = entry_point.split(":")
    path = folder / name
    path.write_text(f"import re, sys\nfrom {module} import {function}\n"
                    f"if __name__ == '__main__':\n"
                    f"    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                    f"    sys.exit({function}())\n")
    return path


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (ROOT / ".ci/run").read_text().splitlines()
    readme = [line.strip() for block in code_blocks(README.read_text()) for line in block.splitlines()]
    install = next(line for line in readme if line.startswith("pip install torch"))
    assert install in [line.strip() for line in ci]
    assert "python -m pytest" in readme and "python -m pytest" in [line.strip() for line in ci]


def sentences(text: str) -> set[str]:
    """Sentences of 15 words or more, with markdown and white space folded."""
    flat = re.sub(r"[`*_>|]", "", re.sub(r"\s+", " ", text))
    return {s.strip().lower() for s in re.split(r"(?<=[.;:!?])\s", flat) if len(s.split()) >= 15}


def docstrings() -> dict[str, str]:
    found = {}
    for path in [*ROOT.glob("models/**/*.py"), *ROOT.glob("orchestrator/**/*.py")]:
        tree = ast.parse(path.read_text())
        nodes = [tree, *(n for n in ast.walk(tree)
                         if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)))]
        text = "\n\n".join(filter(None, (ast.get_docstring(n) for n in nodes)))
        found[str(path.relative_to(ROOT))] = text
    return found


def test_no_sentence_has_two_homes():
    homes: dict[str, str] = {}
    places = {str(p.relative_to(ROOT)): p.read_text() for p in [README, *DOCS]} | docstrings()
    repeated = []
    for place, text in places.items():
        for sentence in sentences(text):
            if sentence in homes and homes[sentence] != place:
                repeated.append(f"{homes[sentence]} and {place}: {sentence[:80]}")
            homes.setdefault(sentence, place)
    assert not repeated, "\n".join(repeated)

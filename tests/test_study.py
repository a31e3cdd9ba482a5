"""Study files: the schema, bad input, the searcher and --dry-run (no Ray needed)."""
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load_study
from orchestrator.sweep import first_trials, grid_size, main as sweep_main

SPACES = Path(__file__).parent.parent / "search_spaces"
SMOKE = yaml.safe_load((SPACES / "smoke.yaml").read_text())


def write(tmp_path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_changes(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(SMOKE))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return data


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_is_valid(path):
    study = load_study(path)
    assert study.architectures()


@pytest.mark.parametrize("changes, message", [
    (dict(colour="red"), "colour: unknown key"),
    (dict(train__epochz=3), "train.epochz: unknown key"),
    (dict(trials="many"), "trials: Input should be a valid integer"),
    (dict(space__depth={"type": "categorical", "choices": [8, 21]}), r"depth=21, k=1 is no valid architecture: depth must be 6n\+2"),
    (dict(space__k={"type": "int", "low": 0, "high": 2}), "k=0 is no valid architecture: architecture.k: Input should be greater"),
    (dict(space__depth={"type": "float", "low": 8, "high": 20}), "architecture keys take int"),
    (dict(space__colour=3), "unknown key 'colour'"),
    (dict(space__lr={"type": "uniform", "low": 0.1, "high": 1}), "space.lr"),
    (dict(resources__workers=0), "resources.workers: Input should be greater than or equal to 1"),
    (dict(train__checkpoint_dir="x"), "managed by the sweep"),
    (dict(searcher__objectives=[{"metric": "test_error"}, {"metric": "train_gflops"}]),
     "asha needs a single objective"),
    (dict(searcher__objectives=[{"metric": "accuracy"}]), "searcher.objectives.0.metric"),
    (dict(name="no spaces allowed"), "name: String should match pattern"),
])
def test_bad_study_fails_with_one_line_naming_the_key(tmp_path, capsys, changes, message):
    path = write(tmp_path, with_changes(**changes))
    with pytest.raises(ConfigError, match=message):
        load_study(path)
    # The command line: exit 2, one line, nothing created in MLflow or on disk.
    before = set(tmp_path.iterdir())
    assert sweep_main([str(path), "--storage-path", str(tmp_path / "results"),
                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert set(tmp_path.iterdir()) == before


def test_malformed_yaml_and_overrides(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nspace: {depth: [8,\n")
    assert sweep_main([str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    study = load_study(SPACES / "smoke.yaml", ["train.epochs=5", "space.k=2", "trials=7"])
    assert study.train.epochs == 5 and study.space["k"] == 2 and study.trials == 7
    with pytest.raises(ConfigError, match="expected key=value"):
        load_study(SPACES / "smoke.yaml", ["trials"])


def test_trial_config_merges_train_fixed_and_sampled():
    study = load_study(SPACES / "smoke.yaml")
    cfg = study.trial_config({"depth": 14, "k": 2, "lr": 0.05})
    assert (cfg.architecture.total_depth, cfg.architecture.k, cfg.lr) == (14, 2, 0.05)
    assert cfg.seed == 0 and cfg.dataset == "synthetic" and cfg.epochs == 2


def test_same_seed_proposes_the_same_first_trials():
    study = load_study(SPACES / "smoke.yaml")
    a, b = first_trials(study, 6), first_trials(study, 6)
    assert a == b and len(a) == 6
    other = load_study(SPACES / "smoke.yaml", ["searcher.seed=1"])
    assert first_trials(other, 6) != a


def test_grid_sampler_proposes_every_combination(tmp_path):
    data = with_changes(searcher__sampler="grid")
    data["space"]["lr"] = {"type": "categorical", "choices": [0.05, 0.1]}
    study = load_study(write(tmp_path, data))
    assert grid_size(study) == 8
    trials = first_trials(study, 8)
    assert {(t["depth"], t["k"], t["lr"]) for t in trials} == {
        (d, k, lr) for d in (8, 14) for k in (1, 2) for lr in (0.05, 0.1)}


def test_dry_run_prints_architectures_and_budget(tmp_path, capsys):
    data = with_changes(budget={"max_params": 160_000})
    assert sweep_main([str(write(tmp_path, data)), "--dry-run", "--dry-run-trials", "5"]) == 0
    out = capsys.readouterr().out
    assert "5 trials planned" not in out and "4 trials planned" in out
    assert "d8-k2-w1" in out and "149,242" in out
    assert "pruned: 172,506 parameters > max_params 160,000" in out or \
           "pruned: 343,674 parameters > max_params 160,000" in out
    assert not (tmp_path / "results").exists()


def test_multi_objective_search(tmp_path, capsys):
    data = with_changes(scheduler={"type": "none"}, searcher__objectives=[
        {"metric": "test_error", "mode": "min"}, {"metric": "train_gflops", "mode": "min"}])
    study = load_study(write(tmp_path, data))
    assert len(first_trials(study, 3)) == 3
    assert sweep_main([str(write(tmp_path, data)), "--dry-run"]) == 0


@pytest.mark.parametrize("changes, message", [
    (dict(parallel={"bp": 2}), r"k=1 is no valid architecture: parallel.bp=2 exceeds k=1"),
    (dict(parallel={"dp": 2}, resources__workers=3), "resources.workers=3 but parallel"),
    (dict(parallel={"pp": 5}), "exceeds the 3 blocks"),
])
def test_bad_parallel_layouts_in_studies(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write(tmp_path, with_changes(**changes)))
    study = load_study(write(tmp_path, with_changes(parallel={"dp": 2})))
    assert study.resources.workers == 2
    assert study.trial_config({"depth": 8, "k": 2, "lr": 0.1}).parallel.dp == 2

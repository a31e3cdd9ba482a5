"""Study files: the schema, bad input, the searcher and --dry-run (no Ray needed)."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.errors import ConfigError
from orchestrator.study.config import load_study
from orchestrator.study.preview import first_trials
from orchestrator.study.trials import planned_trials
from orchestrator.commands.sweep import main as sweep_main

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
    assert study.feasible()
    trials = first_trials(study, 100)
    assert trials and len({tuple(sorted(t.items())) for t in trials}) == len(trials)


@pytest.mark.parametrize("changes, message", [
    (dict(colour="red"), "colour: unknown key"),
    (dict(train__epochz=3), "train.epochz: unknown key"),
    (dict(trials="many"), "trials: Input should be a valid integer"),
    (dict(space__depth={"type": "categorical", "choices": [8, 21]}),
     r"depth=21, k=1 is no valid architecture: depth must be 6n\+2"),
    (dict(space__k={"type": "int", "low": 0, "high": 2}),
     "k=0 is no valid architecture: architecture.k: Input should be greater"),
    (dict(space__depth={"type": "float", "low": 8, "high": 20}), "architecture keys take int"),
    (dict(space__colour=3), "unknown key 'colour'"),
    # Search ranges are checked at load, before Ray or MLflow (they used to fail in Optuna).
    (dict(space__lr={"type": "float", "low": -1, "high": 0.1}),
     r"space.lr: the value -1.0 is not a valid lr \(Input should be greater than 0\)"),
    (dict(space__batch_size={"type": "categorical", "choices": [1, 128]}),
     "space.batch_size: the value 1 is not a valid batch_size"),
    (dict(space__epochs={"type": "int", "low": -5, "high": 3}),
     "space.epochs: the value -5 is not a valid epochs"),
    (dict(space__lr={"type": "float", "low": 0.5, "high": 0.1}),
     "study.yaml: space.lr: low 0.5 is above high 0.1; swap them$"),
    (dict(space__lr={"type": "float", "low": 0, "high": 0.1, "log": True}),
     r"study.yaml: space.lr: log: true needs low > 0 \(got 0.0\); raise low or drop log$"),
    (dict(space__depth={"type": "int", "low": 8, "high": 200_000, "step": 6}),
     "space: 66666 architectures; narrow the ranges"),
    (dict(space__depth={"type": "int", "low": 8, "high": 10_000_000, "step": 6}),
     "space.depth: 1,666,666 values from 8 to 10000000; at most 100,000"),
    (dict(space__lr={"type": "uniform", "low": 0.1, "high": 1}), "space.lr"),
    (dict(space__seed={"type": "categorical", "choices": [0, 1]}),
     "seeds are replicates, not searched; list them as the top-level key seeds"),
    (dict(seeds=[0, 0]), "seeds must be distinct"),
    (dict(budget={"min_params": 10_000_000}), r"budget: none of the space's 4 architectures "
     r"\(75,290 to 343,674 parameters\) is within min_params..max_params; widen"),
    (dict(searcher__sampler="n0"), "space.lr: the n0 searcher compares architectures at one "
     "recipe; fix lr to one value"),
    (dict(searcher__sampler="n0", space__lr=0.1), "scheduler.type: the n0 searcher compares"),
    (dict(searcher__sampler="n0", scheduler={"type": "none"}, space__lr=0.1, space__k=2),
     "the n0 searcher needs matched pairs"),
    (dict(resources__workers=0), "resources.workers: Input should be greater than or equal to 1"),
    (dict(resources__cpus_per_worker=0), "resources.cpus_per_worker: 0 CPUs: give a number "
     "above 0, or auto"),
    (dict(resources__gpus_per_worker="lots"), "resources.gpus_per_worker: 'lots': give a "
     "number, or auto$"),
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
    assert [c.name for c in study.feasible()] == ["d8-k1-w1", "d8-k2-w1", "d14-k1-w1",
                                                 "d14-k2-w1"]
    cfg = study.trial_config({"arch": "d14-k2-w1", "lr": 0.05, "seed": 3})
    assert (cfg.architecture.total_depth, cfg.architecture.k, cfg.lr) == (14, 2, 0.05)
    assert cfg.seed == 3 and cfg.dataset == "synthetic" and cfg.epochs == 2


def test_a_relative_sqlite_uri_is_the_database_in_the_starting_folder(tmp_path, monkeypatch):
    from orchestrator.study.mlflow_client import artifact_location

    monkeypatch.chdir(tmp_path)
    study = load_study(SPACES / "smoke.yaml", ["mlflow.tracking_uri=sqlite:///runs/mlflow.db"])
    assert study.tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert artifact_location(study.tracking_uri()) == (tmp_path / "runs" / "mlartifacts").as_uri()


def test_same_seed_proposes_the_same_first_trials():
    study = load_study(SPACES / "smoke.yaml")
    a, b = first_trials(study, 6), first_trials(study, 6)
    assert a == b and len(a) == 6
    other = load_study(SPACES / "smoke.yaml", ["searcher.seed=1"])
    assert first_trials(other, 6) != a


def test_grid_sampler_proposes_every_combination_with_every_seed(tmp_path):
    data = with_changes(searcher__sampler="grid", seeds=2)
    data["space"]["lr"] = {"type": "categorical", "choices": [0.05, 0.1]}
    study = load_study(write(tmp_path, data))
    assert planned_trials(study) == 16
    trials = first_trials(study, 20)
    assert sorted((t["arch"], t["lr"], t["seed"]) for t in trials) == sorted(
        (f"d{d}-k{k}-w1", lr, s) for d in (8, 14) for k in (1, 2) for lr in (0.05, 0.1)
        for s in (0, 1))


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_samplers_never_repeat_a_trial_and_give_seeds_in_turn(tmp_path, sampler):
    """The main study's nets under Optuna's samplers: 10 architectures (5 pairs) x 5 seeds;
    asked for more, every proposal is distinct and one of them, then the space is done."""
    study = load_study(SPACES / "depth_vs_k.yaml", [f"searcher.sampler={sampler}",
                                                   "trials=80"])
    assert len(study.feasible()) == 10 and planned_trials(study) == 50
    trials = first_trials(study, 80)
    assert len(trials) == 50
    assert len({(t["arch"], t["seed"]) for t in trials}) == 50
    assert {t["arch"] for t in trials} == {c.name for c in study.feasible()}
    for t in trials:  # seeds in turn: a configuration's seeds before it, all taken
        earlier = [u["seed"] for u in trials[:trials.index(t)] if u["arch"] == t["arch"]]
        assert t["seed"] == len(earlier)


@pytest.mark.usefixtures("in_empty_folder")
def test_dry_run_lists_the_budget_once_and_proposes_only_inside_it(tmp_path, capsys):
    data = with_changes(budget={"max_params": 160_000}, trials=10, space__lr=0.1)
    assert sweep_main([str(write(tmp_path, data)), "--dry-run", "--dry-run-trials", "5"]) == 0
    out = capsys.readouterr().out
    assert "2 architectures in the budget, 2 outside it (never sampled)" in out
    assert "172,506 parameters > max_params 160,000" in out
    assert "343,674 parameters > max_params 160,000" in out
    assert "at most 2 trials" in out  # 2 architectures x 1 seed
    proposals = out.split("the first")[1]
    assert "d8-k2-w1" in proposals and "d14" not in proposals
    assert not (tmp_path / "results").exists()


@pytest.mark.usefixtures("in_empty_folder")
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
    assert study.trial_config({"arch": "d8-k2-w1", "lr": 0.1}).parallel.dp == 2


def test_searcher_state_survives_save_and_restore(tmp_path):
    """What Tune does on resume: a fresh searcher restored from the saved one continues where
    it stopped, never repeating a trial (n0 and TPE), and takes the results of trials that were
    running when it was saved."""
    from orchestrator.study.searchers import build_searcher

    for sampler in ("n0", "tpe"):
        study = load_study(SPACES / "depth_vs_k.yaml", [f"searcher.sampler={sampler}",
                                                        "budget.epochs=8000"])  # not the cap
        first = build_searcher(study)
        before = [first.suggest(f"t{i}") for i in range(6)]
        first.on_trial_complete("t0", {"test_error": 0.07, "epoch": 200})
        first.save(str(tmp_path / f"{sampler}.pkl"))
        again = build_searcher(study)
        again.restore(str(tmp_path / f"{sampler}.pkl"))
        # A trial running when the study was saved reports again after the restore.
        again.on_trial_result("t1", {"test_error": 0.09, "epoch": 1})
        again.on_trial_complete("t1", {"test_error": 0.08, "epoch": 200})
        after = [again.suggest(f"t{i}") for i in range(6, 12)]
        seen = [(t["arch"], t["seed"]) for t in before + after if isinstance(t, dict)]
        assert len(seen) == len(set(seen)) >= 10


def test_sweep_end_logs_n0_to_the_parent_run(tmp_path, capsys):
    """The end of a pair study (no Ray): n0 printed, report and n0 metrics in MLflow."""
    from mlflow.tracking import MlflowClient

    from orchestrator.study.outputs import report_n0
    from orchestrator.study.tracking import StudyRun
    from tests.sweeps import new_database

    uri = new_database(tmp_path)
    study = load_study(SPACES / "paper_table2.yaml", [f"mlflow.tracking_uri={uri}"])
    parent = StudyRun(MlflowClient(uri), study)
    parent.open(None, tmp_path, "name: paper_table2\n")
    rng = np.random.default_rng(0)
    rows = []
    for pair in study.pairs_to_train():  # Table II's medians, five noisy seeds each
        for name, error in ((pair.deep, {8: 7.75, 20: 6.27, 30: 6.02}[pair.depth]),
                            (pair.multi, {8: 9.28, 20: 6.31, 30: 5.89}[pair.depth])):
            arch = next(c for c in study.feasible() if c.name == name)
            for seed in study.seeds:
                rows.append({"trial": f"{name}-{seed}", "architecture": name, "seed": seed,
                             "depth": arch.architecture.total_depth, "k": arch.architecture.k,
                             "width": 1, "params": arch.params, "flops": 1,
                             "final_test_error": (error + rng.normal(0, 0.05)) / 100,
                             "status": "done", "history": None})
    report_n0(rows, study, parent, tmp_path, "converged: test")
    parent.close("FINISHED", 0)
    out = capsys.readouterr().out
    assert "n0: 2" in out and "n0 search: converged: test" in out
    run = MlflowClient(uri).get_run(parent.run_id)
    assert 20 < run.data.metrics["n0"] < 30
    assert run.data.metrics["n0_low"] <= run.data.metrics["n0"] <= run.data.metrics["n0_high"]
    assert run.data.tags["n0"].startswith("n0: 2") and run.data.tags["n0_search"]
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent.run_id, "report")}
    assert "report/report.md" in logged and "report/difference_vs_depth.png" in logged
    # The experiment is one of model training, not GenAI.
    experiment = MlflowClient(uri).get_experiment(parent.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_trial_names_show_what_was_searched():
    """Two trials of one architecture and seed that differ in a searched lr differ in name."""
    study = load_study(SPACES / "smoke.yaml")
    assert "lr" in study.searched()
    arch = study.feasible()[0].name
    first = study.trial_name({"arch": arch, "seed": 0, "lr": 0.0531})
    second = study.trial_name({"arch": arch, "seed": 0, "lr": 0.0877})
    assert first == f"{arch}-s0-lr0.0531" and second == f"{arch}-s0-lr0.0877"
    fixed = load_study(SPACES / "smoke.yaml", ["space.lr=0.05"])
    assert fixed.trial_name({"arch": arch, "seed": 1}) == f"{arch}-s1"


def test_the_sampler_registry_is_the_one_list_of_samplers():
    """searcher.sampler accepts exactly n0 and the registry's Optuna samplers, and each entry
    builds a searcher that suggests a trial of the study."""
    from typing import get_args

    from orchestrator.study.samplers import OPTUNA_SAMPLERS
    from orchestrator.study.searchers import build_searcher
    from orchestrator.study.settings import SearcherSettings

    allowed = set(get_args(SearcherSettings.model_fields["sampler"].annotation))
    assert allowed == {"n0", *OPTUNA_SAMPLERS}
    for name in OPTUNA_SAMPLERS:
        lr = "space.lr={type: categorical, choices: [0.1, 0.05]}"
        study = load_study(SPACES / "smoke.yaml", [f"searcher.sampler={name}", lr])
        suggestion = build_searcher(study).suggest("t0")
        assert suggestion["arch"] in {c.name for c in study.feasible()}
        assert suggestion["lr"] in (0.1, 0.05) and suggestion["seed"] in study.seeds



def test_one_outcome_for_every_reader():
    """The summary, the tracker and the searchers read a trial's outcome through outcome()."""
    from orchestrator.results import DIVERGED, outcome, trained, training_flops

    done = {"epoch": 5, "epochs_total": 5, "test_error": 0.3}
    assert outcome(done) == "done" and trained("done")
    assert outcome({**done, "epoch": 2}) == "stopped" and trained("stopped")
    assert outcome({DIVERGED: "loss became non-finite at step 4"}) == "diverged"
    assert outcome(done, errored=True) == "failed" and outcome(None) == "failed"
    assert not trained("diverged") and not trained("failed")
    assert training_flops(1e6, steps=10, batch_size=128) == 3 * 1e6 * 10 * 128


@pytest.mark.usefixtures("in_empty_folder")
def test_the_main_study_closes_in_most_studies_of_its_dry_run(capsys):
    """The main study as shipped: its dry run's simulated studies end with a closed interval in
    most (the design before, with no pair past depths 14 and 38, closed 1 of 10). What it costs
    and what an extension would need: test_extension.py."""
    assert sweep_main([str(SPACES / "depth_vs_k.yaml"), "--dry-run", "--dry-run-trials", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cost = next(x for x in lines if x.startswith("cost in"))
    assert "worst case 8,000" in cost and cost.split("for a 95% interval of n0 ")[1].split(
        " layers wide")[0].isdigit()  # closed in the median study
    chance = next(x for x in lines if x.startswith("chance to close: "))
    closed, of = chance.split("(")[1].split(" simulated")[0].split(" of ")
    assert int(closed) > 0.6 * int(of)


def test_simulated_results_give_a_pair_the_ladder_added_its_difference():
    """The dry run's simulation: a pair added past the deepest one differs by the true curve at
    its depth (it once differed by nothing: its multi net was read as a deep one)."""
    from orchestrator.study.n0_search import _simulated_error, n0_policy

    policy = n0_policy(load_study(SPACES / "depth_vs_k.yaml"))
    pair, nets = policy.grow("deeper", policy.pairs, policy.nets)
    error = _simulated_error(30.0, {}, np.random.default_rng(0), noise=0.0, rho=0.7)
    multi = next(n for n in nets if n.name == pair.multi)
    assert pair.depth == 44 and multi.k == 2
    assert error(multi, 1.0) == pytest.approx(0.85 * (30 / 44 - 1))
    assert error(next(n for n in nets if n.name == pair.deep), 1.0) == 0.0
    assert error(multi, 0.125) != error(multi, 1.0)  # its short schedule: a curve of its own


def test_the_trials_that_did_not_train_are_named_with_what_they_raised():
    """A trial that raised, or ended without an epoch, is listed by its name with the last line
    of its error; trained, stopped and diverged trials are not."""
    from types import SimpleNamespace as Result

    from orchestrator.results import DIVERGED
    from orchestrator.study.outputs import failed_trials

    study = load_study(SPACES / "smoke.yaml", ["space.lr=0.05"])
    arch = study.feasible()[0].name
    config = {"arch": arch, "seed": 0}
    raised = RuntimeError("Traceback (most recent call last):\n  File x\n\nValueError: "
                          "train_size 30 is smaller than one batch (64)\n")
    results = [Result(config=config, metrics={"epoch": 2, "epochs_total": 2}, error=None),
               Result(config=config, metrics={"epoch": 1, "epochs_total": 2}, error=None),
               Result(config=config, metrics={DIVERGED: "loss is nan"}, error=None),
               Result(config={**config, "seed": 1}, metrics={}, error=raised),
               Result(config={**config, "seed": 2}, metrics=None, error=None),
               Result(config=None, metrics=None, error=None)]  # never started: interrupted
    assert failed_trials(results, study) == {
        f"{arch}-s1": "ValueError: train_size 30 is smaller than one batch (64)",
        f"{arch}-s2": "it ended without reporting an epoch"}

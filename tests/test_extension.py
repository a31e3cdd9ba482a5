"""A study that grows: which changes of a study file extend a trained study and which are refused,
the finished part saved once (a kill at any point repeats nothing), and the continuation's
searcher seeded with every finished trial."""
import json
import signal
from ray import cloudpickle
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.study.config import load_study
from orchestrator.study.extension import (PRIOR_FILE, Prior, begin, check_extension, classify,
                                          prior_for, read_prior, seeded)

ROOT = Path(__file__).parent.parent
PAIRS = str(ROOT / "search_spaces" / "pairs_cpu.yaml")
DEPTH_VS_K = str(ROOT / "search_spaces" / "depth_vs_k.yaml")
CIFAR_CPU = str(ROOT / "search_spaces" / "cifar_cpu.yaml")


def dump(path: str, *overrides: str) -> dict:
    return load_study(path, list(overrides)).model_dump(mode="json")


@pytest.mark.parametrize("path, overrides, grown", [
    (PAIRS, ["trials=20"], ["trials 12 -> 20"]),
    (PAIRS, ["budget.epochs=200"], ["budget.epochs 60.0 -> 200.0"]),
    (PAIRS, ["seeds=3"], ["seeds [0, 1] -> [0, 1, 2]"]),
    (PAIRS, ["n0.target_width=3"], ["n0.target_width 6.0 -> 3.0"]),
    (PAIRS, ["pairs.deep=[[2,2,2],[4,4,4],[6,6,6],[8,8,8]]"],
     ["configurations", "pairs.deep"]),
    (DEPTH_VS_K, ["budget.epochs=12000", "trials=120", "concurrency=4"],
     ["budget.epochs 8000.0 -> 12000.0", "trials 110 -> 120"]),
    (CIFAR_CPU, ["space.depth.choices=[8,14,20,26]"], ["space.depth.choices"]),
])
def test_growth_is_an_extension(path, overrides, grown):
    base = ["budget.epochs=60"] if "budget.epochs=200" in overrides else []
    change = check_extension(dump(path, *base), dump(path, *overrides), "s", "/r")
    assert not change.refused
    assert [line if " -> " in g else line.split(" ")[0] for line, g in
            zip(change.grown, grown)] == grown
    assert change.allowed == (["concurrency 8 -> 4"] if "concurrency=4" in overrides else [])


@pytest.mark.parametrize("overrides, keys", [
    (["train.epochs=6"], ["train.epochs"]),                       # the recipe
    (["train.lr=0.05", "trials=20"], ["train.lr"]),              # the recipe beside growth
    (["train.train_size=20000"], ["train.train_size"]),          # the dataset
    (["pairs.deep=[[2,2,2],[6,6,6]]"], ["configurations", "pairs.deep"]),  # a trained pair gone
    (["seeds=[0, 5]"], ["seeds"]),                               # seed 1 replaced
    (["trials=8"], ["trials"]),                                  # shrinks
    (["n0.target_width=8"], ["n0.target_width"]),                # looser
    (["budget.epochs=100"], ["budget.epochs"]),                  # a cap where there was none
    (["searcher.seed=1", "trials=20"], ["searcher.seed"]),       # another search
    (["n0.level=0.9", "trials=20"], ["n0.level"]),               # other statistics
])
def test_what_alters_trained_trials_is_refused_naming_the_keys(overrides, keys):
    with pytest.raises(ConfigError) as err:
        check_extension(dump(PAIRS), dump(PAIRS, *overrides), "pairs_cpu", "/r")
    line = str(err.value)
    assert "\n" not in line and "another --storage-path" in line
    named = [part.split(" ")[0] for part in line.split(": ", 1)[1].split(" (an extension")[0]
             .split("; ")]
    assert named == keys


def test_a_change_that_grows_nothing_is_refused():
    with pytest.raises(ConfigError, match="concurrency 2 -> 1 and nothing that grows it"):
        check_extension(dump(PAIRS), dump(PAIRS, "concurrency=1"), "pairs_cpu", "/r")
    with pytest.raises(ConfigError, match="with a different configuration"):
        check_extension(None, dump(PAIRS, "trials=20"), "pairs_cpu", "/r")  # an old folder


def test_classify_names_space_value_changes_of_trained_nets():
    change = classify(dump(CIFAR_CPU), dump(CIFAR_CPU, "space.k.choices=[1]"))
    assert [line.split(" ")[0] for line in change.refused] == ["space.k.choices"]


def fake_experiment(folder: Path, log: list[dict]) -> None:
    """The Tune state files of a finished n0 study (its searcher's state is JSON)."""
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"pickle")
    (folder / "experiment_state-2026-12-07_01-00-00.json").write_text("{}")
    (folder / "searcher-state-2026-12-07_01-00-00.pkl").write_text(json.dumps(
        {"plan": {}, "log": log, "added": [], "running": {}, "fixed": {}}))
    (folder / "train-abc").mkdir()
    (folder / "train-abc" / "params.pkl").write_bytes(b"kept")


def row(trial: str, arch: str, seed: int, error: float) -> dict:
    return {"trial": trial, "architecture": arch, "seed": seed, "fidelity": 1.0, "depth": 8,
            "k": 2, "width": 1, "params": 10, "flops": 20, "epochs": 5,
            "best_test_error": error, "final_test_error": error, "time_s": 1.0,
            "status": "done", "history": None}


def test_the_finished_part_is_saved_once_and_the_searcher_replays_it(tmp_path):
    from orchestrator.study.n0_search import N0Search, n0_policy

    study = load_study(PAIRS, ["trials=20"])
    pair = study.pairs_to_train()[0]
    log = [{"arch": pair.deep, "seed": 0, "fidelity": 1.0, "error": 30.0, "cost": 5},
           {"arch": pair.multi, "seed": 0, "fidelity": 1.0, "error": 29.0, "cost": 5}]
    results = tmp_path / "pairs_cpu"
    fake_experiment(results, log)
    state = {"config_hash": "0" * 16}
    change = check_extension(dump(PAIRS), dump(PAIRS, "trials=20"), "pairs_cpu", str(results))
    calls = []

    def rows():
        calls.append(1)
        return [row("t1", pair.deep, 0, 0.30), row("t2", pair.multi, 0, 0.29)]

    prior = begin(str(results), state, "1" * 16, change, rows)
    assert prior.extensions == ["trials 12 -> 20"] and prior.trial_ids() == {"t1", "t2"}
    # Only the continuation can be restored now; the trials' own files stay.
    assert sorted(p.name for p in results.iterdir()) == [PRIOR_FILE, "train-abc"]
    assert (results / "train-abc" / "params.pkl").exists()
    # Run again (a kill after this point): nothing is read or summarized twice.
    assert begin(str(results), state, "1" * 16, change, rows).rows == prior.rows
    assert len(calls) == 1 and prior_for(str(results), "2" * 16) is None
    back = read_prior(str(results))
    assert back.rows[0]["architecture"] == pair.deep and back.searcher["log"] == log

    searcher = seeded(N0Search(n0_policy(study)), back)
    assert [r.saved() for r in searcher.inner.policy.log] == log
    assert searcher.inner.policy.plan.ends == ()  # the first part ended with no look taken
    trained = {(r["arch"], r["seed"]) for r in log}
    suggested = [searcher.suggest(f"x{i}") for i in range(4)]
    assert not trained & {(s["arch"], s["seed"]) for s in suggested if isinstance(s, dict)}
    # Saved and restored (Tune pickles the seeded searcher, then loads its saved state into
    # it): each finished trial is in the log once.
    saved = tmp_path / "searcher-state.pkl"
    searcher.save(str(saved))
    restored = cloudpickle.loads(cloudpickle.dumps(searcher))  # as Tune pickles it
    restored.restore(str(saved))
    assert [r.saved() for r in restored.inner.policy.log] == log
    assert restored.inner.trials == searcher.inner.trials


def test_a_second_extension_keeps_the_first_ones_trials(tmp_path):
    results = tmp_path / "pairs_cpu"
    fake_experiment(results, [])
    first = check_extension(dump(PAIRS), dump(PAIRS, "trials=20"), "p", str(results))
    begin(str(results), {"config_hash": "0" * 16}, "1" * 16, first,
          lambda: [row("t1", "a", 0, 0.3)])
    fake_experiment(tmp_path / "again", [])  # the continuation's own Tune state
    for path in (tmp_path / "again").iterdir():
        if path.is_file():
            path.rename(results / path.name)
    second = check_extension(dump(PAIRS, "trials=20"), dump(PAIRS, "trials=30"), "p",
                             str(results))
    prior = begin(str(results), {"config_hash": "1" * 16}, "2" * 16, second,
                  lambda: [row("t2", "b", 0, 0.3)])
    assert prior.trial_ids() == {"t1", "t2"}
    assert prior.extensions == ["trials 12 -> 20", "trials 20 -> 30"]


def test_an_edited_prior_file_is_refused(tmp_path):
    (tmp_path / PRIOR_FILE).write_text('{"for": "x", "rows": [{"trial": 1}]}')
    with pytest.raises(ConfigError, match="is not a study's finished trials"):
        read_prior(str(tmp_path))


def test_an_n0_study_stopped_resumed_extended_and_killed_trains_each_net_once(
        ray_address, tmp_path, capsys):
    """A two-pair n0 study (one epoch a trial, one trial at a time) through what a study meets:
    - run at trials=2 (the first pair) in a driver of its own, stopped by SIGTERM (as Ctrl-C:
      `ray job stop`, Kubernetes, batch schedulers) during its last trial: exit 143, the parent
      run KILLED, no trial left RUNNING or read as done; the same command resumes it
      (Tuner.restore) in the same parent run: finished trials kept, each epoch once;
    - extended to trials=12: a change that would alter the trained nets is refused; the
      extension's driver is killed (SIGKILL) once one of its trials has finished and the next
      one trains; the same command again (Tuner.restore, the searcher's state with it) loses
      nothing and repeats nothing, in the same parent run tagged with the extension: the
      second pair, a second seed where the difference is unsure, then the searcher stops and
      says why; the sweep prints the report and n0 and logs them to the parent run;
      orchestrator.report reads the same study back from MLflow;
    - every file Ray would unpickle from the folder was signed by the sweeps; one planted
      there is refused before Ray starts."""
    from tests.sweeps import (assert_resumes_once, child_statuses, new_database, runs,
                              start_sweep, wait_for)
    from tests.test_sweep import pair_study

    path = pair_study(tmp_path)
    uri, results = new_database(tmp_path), tmp_path / "results"
    args = [str(path), "--storage-path", str(results), "--tracking-uri", uri,
            "--set", "concurrency=1"]
    from orchestrator.commands.sweep import main as sweep_main

    first_part = [*args, "--set", "trials=2"]
    proc = start_sweep(first_part[1:], ray_address, study=str(path), cwd=tmp_path)
    # During the last trial: Tune's clean-up marks it TERMINATED, which must not read as done.
    wait_for(lambda: sorted(child_statuses(uri, "pairs")) == ["FINISHED", "RUNNING"], proc)
    proc.send_signal(signal.SIGTERM)  # SIGTERM takes the Ctrl-C path; exit 143
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-3000:]
    assert "Fatal Python error" not in output and "best:" not in output
    _, parents, children = runs(uri, "pairs")
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    statuses = [c.info.status for c in children]
    assert statuses.count("FINISHED") == 1 and "RUNNING" not in statuses  # not brought "up to date"
    first = assert_resumes_once(first_part, uri, results, "pairs", epochs=1)
    _, (parent,), _ = runs(uri, "pairs")
    assert len(first) == 2 and parent.info.status == "FINISHED"
    # Today's refusal stays for what would alter the trained nets.
    assert sweep_main([*args, "--set", "train.lr=0.2", "--set", "trials=12"]) == 2
    assert "train.lr 0.1 -> 0.2" in capsys.readouterr().err

    extended = [*args, "--set", "trials=12"]
    proc = start_sweep(extended[1:], ray_address, study=str(path), cwd=tmp_path)
    wait_for(lambda: child_statuses(uri, "pairs").count("FINISHED") >= 3
             and "RUNNING" in child_statuses(uri, "pairs"), proc)
    proc.kill()
    output = proc.communicate(timeout=60)[0]
    assert "study pairs extended (trials 2 -> 12): 2 trials kept from before" in output

    children = assert_resumes_once(extended, uri, results, "pairs", epochs=1)
    trained = [(c.data.tags["architecture"], c.data.tags["seed"]) for c in children]
    assert len(trained) == len(set(trained)) and 6 <= len(trained) <= 8  # each net-seed once
    assert {c.info.run_id for c in first} <= {c.info.run_id for c in children}
    client, (again,), _ = runs(uri, "pairs")
    assert again.info.run_id == parent.info.run_id
    assert again.data.tags["extended"] == "trials 2 -> 12"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"study.yaml", "study.extension-1.yaml"} <= artifacts
    out = capsys.readouterr().out
    assert "study pairs extended (trials 2 -> 12): 2 trials kept from before" in out
    report = (results / "pairs" / "report" / "report.md").read_text()
    assert "- study pairs extended (trials 2 -> 12)" in report
    assert_ends_with_n0(out.splitlines(), uri, tmp_path, capsys)
    # The finished study, run again: nothing to do.
    assert sweep_main(extended) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert_signed_and_a_planted_file_refused(results / "pairs", extended, tmp_path, capsys)


def assert_ends_with_n0(out: list[str], uri: str, tmp_path: Path, capsys) -> None:
    """The sweep's console at the end of an n0 study: the searcher's verdict, n0, and the
    report (the pre-resnet-26 of the second pair in it), n0 logged to the parent run; the
    report command finds the same n0 in MLflow."""
    from orchestrator.commands.report import main as report_main
    from tests.sweeps import runs

    n0_line = next(line for line in out if line.startswith("n0: "))
    verdict = next(line for line in out if line.startswith("n0 search: "))
    assert "no trial left" in verdict or "n0 not found" in verdict
    assert any("depth 26 (" in line for line in out)
    client, (parent,), _ = runs(uri, "pairs")
    assert parent.data.tags["n0"] == n0_line
    if not n0_line.startswith("n0: not found"):
        assert {"n0", "n0_low", "n0_high"} & set(parent.data.metrics)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/difference_vs_depth.png",
            "report/pareto_error_vs_flops.png", "report/error_vs_epoch.png"} <= logged
    assert report_main(["--experiment", "pairs", "--tracking-uri", uri, "--out",
                        str(tmp_path / "report"), "--draws", "200"]) == 0
    assert n0_line.split(" (")[0] in capsys.readouterr().out


def assert_signed_and_a_planted_file_refused(folder: Path, command: list[str], tmp_path: Path,
                                             capsys) -> None:
    """Every file Ray would unpickle from the study's folder was signed by the sweeps (through
    the interruptions, the resumes and the extension); one planted there is refused before
    Ray starts, and its code never runs."""
    import pickle

    from orchestrator.commands.sweep import main as sweep_main
    from orchestrator.trust import check, unpickled_files
    from tests.test_safety import RunsCode

    names = [Path(name).name for name in unpickled_files(str(folder))]
    for prefix in ("tuner.pkl", "experiment_state-", "searcher-state-", "params.pkl"):
        assert any(name.startswith(prefix) for name in names), (prefix, names)
    check(str(folder))
    payload = RunsCode()
    payload.marker = tmp_path / "ran"
    planted = next(folder.glob("searcher-state-*.pkl"))
    planted.write_bytes(pickle.dumps(payload))
    assert sweep_main(command) == 2
    assert f"error: {planted.name} in {folder} was not written by a sweep of yours" in \
        capsys.readouterr().err
    assert not payload.marker.exists()


def trained_folder(tmp_path: Path, *overrides: str) -> tuple[list[str], Path]:
    """A results folder that holds pairs_cpu trained with `overrides` (its state and the n0
    searcher's log of four finished trials, as a sweep leaves them), and the command's args."""
    from orchestrator.study.folder import config_hash, resolve_paths

    args = ["--storage-path", str(tmp_path / "results"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", "--data-dir", str(tmp_path / "data")]
    study = resolve_paths(load_study(PAIRS, [*overrides, *[
        f"{k}={v}" for k, v in (("storage_path", args[1]), ("mlflow.tracking_uri", args[3]),
                                ("train.data_dir", args[5]))]]), fetch=False)
    pairs = study.pairs_to_train()[:2]
    log = [{"arch": net, "seed": 0, "fidelity": 1.0, "error": 30.0, "cost": 5}
           for p in pairs for net in (p.deep, p.multi)]
    results = Path(study.results_place())
    fake_experiment(results, log)
    (results / "multires_study.json").write_text(json.dumps({
        "parent_run_id": "abc", "config_hash": config_hash(study), "experiment": "pairs_cpu",
        "tracking_uri": args[3], "config": study.model_dump(mode="json")}))
    return args, results


def test_the_dry_run_on_a_trained_folder_says_what_an_extension_adds(tmp_path, capsys):
    from orchestrator.commands.sweep import main as sweep_main

    args, results = trained_folder(tmp_path, "trials=4")
    before = sorted(p.name for p in results.iterdir())
    assert sweep_main([PAIRS, *args, "--set", "trials=4", "--dry-run"]) == 0
    assert f"{results} holds this study (4 trials trained (20 epochs))" in capsys.readouterr().out

    assert sweep_main([PAIRS, *args, "--set", "trials=8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (f"extends study pairs_cpu in {results}: trials 4 -> 8; 4 trials trained (20 epochs) "
            f"are kept, none trained again") in out
    assert "it adds at most 20 epochs" in out  # 8 trials of 5 epochs, 20 of them trained
    first = out.split("; the first ")[1].splitlines()[2:]  # what it would train next
    trained = {(net, "0") for p in load_study(PAIRS).pairs_to_train()[:2]
               for net in (p.deep, p.multi)}
    assert first and not trained & {tuple(line.split()[:2]) for line in first}

    assert sweep_main([PAIRS, *args, "--set", "trials=8", "--set", "train.epochs=6",
                       "--dry-run"]) == 2
    assert "train.epochs 5 -> 6" in capsys.readouterr().err
    assert sorted(p.name for p in results.iterdir()) == before  # the dry run changed nothing


@pytest.mark.usefixtures("in_empty_folder")
def test_the_dry_run_prices_a_gpu_study_and_what_an_extension_would_need(capsys):
    from orchestrator.commands.sweep import main as sweep_main

    assert sweep_main([DEPTH_VS_K, "--dry-run", "--dry-run-trials", "1"]) == 0
    out = capsys.readouterr().out
    gpu = next(line for line in out.splitlines() if line.startswith("GPU time: expected"))
    assert "15,686 images/s, bench/RESULTS.md" in gpu
    # worst case: budget.epochs 8,000 x 50,000 images at 15,686 images/s
    assert f"worst case {8000 * 50_000 / 15_686 / 3600:,.1f} GPU hours" in gpu
    close = next(line for line in out.splitlines() if line.startswith("chance to close: "))
    assert "extending it" in close and "more epochs" in close


def test_an_optuna_searchers_continuation_skips_what_was_trained():
    """A TPE study of 4 nets x 2 seeds run at trials=3, then extended: the seeded searcher
    gives the 5 trials not trained yet, then nothing."""
    from orchestrator.study.extension import Prior
    from orchestrator.study.searchers import build_searcher

    smoke = str(ROOT / "search_spaces" / "smoke.yaml")
    grid = ["searcher.sampler=tpe", "space.lr=0.05", "scheduler.type=none", "seeds=2"]
    first = build_searcher(load_study(smoke, [*grid, "trials=3"]))
    trained = []
    for i in range(3):
        config = first.suggest(f"t{i}")
        first.on_trial_complete(f"t{i}", {"test_error": 0.5, "epoch": 2})
        trained.append(json.dumps(config, sort_keys=True))
    prior = Prior("x", ["trials 3 -> 8"], [], json.loads(json.dumps(first.state())))
    more = seeded(build_searcher(load_study(smoke, [*grid, "trials=8"])), prior)
    new = [more.suggest(f"n{i}") for i in range(6)]
    found = [json.dumps(c, sort_keys=True) for c in new if isinstance(c, dict)]
    assert len(found) == 5 and len(set(found)) == 5 and not set(found) & set(trained)


def test_the_stop_of_an_earlier_part_is_a_look_of_the_continuation():
    """The earlier part's end look spent alpha: the continuation's plan counts it, so every
    part's looks together spend at most 1 - level (the interval stays valid across parts)."""
    from orchestrator.study.n0_search import N0Search, n0_policy

    small = load_study(PAIRS, ["trials=6"])
    first = N0Search(n0_policy(small))
    while (trial := first.policy.suggest()) is not None:  # three pairs: the budget is spent
        first.policy.observe(trial[0], trial[1], trial[2], 30.0, 5)
    assert first.policy.stopped and first.policy.full_done() == 6
    assert 6 not in first.policy.plan.looks()  # its end look is not a scheduled one
    continued = seeded(N0Search(n0_policy(load_study(PAIRS, ["trials=20"]))),
                       Prior("1" * 16, ["trials 6 -> 20"], [], first.state()))
    policy = continued.inner.policy
    assert policy.plan.ends == (6,) and policy.ends_done == 1 and len(policy.log) == 6

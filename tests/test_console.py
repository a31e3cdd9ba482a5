"""What a person sees: resources fitted to the machine (or one message with the ways on), the
study's own lines on the console and Ray's output in a log file."""
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from orchestrator.errors import ConfigError
from orchestrator.study.config import load_study
from orchestrator.study.console import StudyProgress
from orchestrator.study.placement import Cluster, check_place, place
from orchestrator.study.preview import worst_epochs
from tests.test_study import SMOKE, with_changes, write

LAPTOP = Cluster(cpus=2, gpus=0)
GPU_NODES = Cluster(cpus=64, gpus=8, cpus_per_gpu=8, node_cpus=32)


def study(tmp_path, **changes):
    return load_study(write(tmp_path, with_changes(**changes)))


@pytest.mark.parametrize("machine, changes, expected", [
    # Two trials share two cores (less the drivers' tenth each): none waits, none is idle.
    (LAPTOP, {}, (0.9, 0, 2)),
    (LAPTOP, dict(concurrency=1), (1.9, 0, 1)),
    (LAPTOP, dict(parallel={"dp": 2}), (0.95, 0, 1)),
    (Cluster(cpus=16, gpus=0), dict(concurrency=4), (3.9, 0, 4)),
    (Cluster(cpus=2, gpus=0, node_cpus=1), dict(parallel={"dp": 2}), (0.9, 0, 1)),
    # On GPUs: one per worker, with the CPUs that come with it.
    (GPU_NODES, dict(train__device="auto", concurrency=8), (7, 1, 8)),
    (GPU_NODES, dict(train__device="auto", concurrency=32, resources={"gpus_per_worker": 0.25}),
     (1, 0.25, 32)),
    (GPU_NODES, dict(train__device="cpu", concurrency=4), (15.9, 0, 4)),
    (GPU_NODES, dict(train__device="auto", resources={"cpus_per_worker": 2}), (2, 1, 2)),
])
def test_auto_resources_follow_the_cluster(tmp_path, machine, changes, expected):
    resources, at_once = place(study(tmp_path, **changes), machine)
    assert (resources.cpus_per_worker, resources.gpus_per_worker, at_once) == expected


def test_sizes_that_leave_cores_idle_are_refused_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"resources.cpus_per_worker: 1 x 1 CPUs \(\+0.1 for "
                       r"the trial driver\) fit 1 trial at a time into 2 CPUs and no GPU, "
                       r"leaving 0.9 CPUs idle; set it to auto \(or lower concurrency to 1\)"):
        place(study(tmp_path, resources={"cpus_per_worker": 1}), LAPTOP)
    resources, at_once = place(study(tmp_path, resources={"cpus_per_worker": 1}, concurrency=1),
                             LAPTOP)
    assert (resources.cpus_per_worker, at_once) == (1, 1)


def test_a_study_that_cannot_fit_says_what_it_needs_and_the_ways_on(tmp_path):
    """A GPU study on a CPU machine: one message naming what it needs, what the machine has,
    the studies beside it that fit, and the overrides that run it here with a time estimate
    from a measured step."""
    folder = tmp_path / "spaces"
    folder.mkdir()
    (folder / "small.yaml").write_text(yaml.safe_dump(SMOKE))
    (folder / "gpu_only.yaml").write_text(yaml.safe_dump(with_changes(
        name="gpu_only", train__device="cuda", resources={"gpus_per_worker": 1})))
    (folder / "broken.yaml").write_text("name: [")
    big = with_changes(name="big", train__device="cuda", concurrency=8,
                       resources={"gpus_per_worker": 1, "cpus_per_worker": 4})
    path = folder / "big.yaml"
    path.write_text(yaml.safe_dump(big))
    with pytest.raises(ConfigError) as error:
        check_place(load_study(path), LAPTOP, str(path))
    first, beside, here = str(error.value).splitlines()
    assert first == ("study big does not fit this cluster: it needs 1 GPU per worker, 1 "
                     "worker per trial and up to 8 trials at once; the "
                     "cluster has 2 CPUs and no GPU. Ways on:")
    assert beside == "  - a study that fits here, beside big.yaml: small.yaml"
    flags = ("--set train.device=cpu --set resources.gpus_per_worker=auto "
             "--set resources.cpus_per_worker=auto")
    assert here.startswith(f"  - this study on these CPUs, {flags}: at least ")
    assert "4 trials" in here and "GFLOP/s measured here in one step, 2 at a time" in here


def test_the_study_lines_reach_the_console_and_rays_output_the_log(tmp_path):
    """Inside ray_output_to, what is written to the process's fds 1 and 2 (Ray's C++ and
    logger output), to sys.stderr (libraries' loggers and prints) and warnings land in the log;
    print and the project's logger stay on the console; afterwards everything is as before."""
    script = textwrap.dedent(f"""
        import logging, os, sys, warnings
        from pathlib import Path
        from orchestrator.commands.cli import setup_logging
        from orchestrator.study.console import ray_output_to
        setup_logging()
        with ray_output_to(Path({str(tmp_path / "results" / "ray.log")!r})):
            os.write(1, b"raylet says\\n")
            os.write(2, b"core_worker.cc: an error-looking line\\n")
            print("INFO mlflow: creating tables", file=sys.stderr)
            warnings.warn("a library's warning")
            print("study line")
            logging.getLogger("orchestrator.study").warning("study warning")
        print("after")
        os.write(2, b"after on fd 2\\n")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, check=True)
    assert done.stdout.splitlines() == ["study line", "after"]
    assert done.stderr.splitlines() == ["warning: study warning", "after on fd 2"]
    log = (tmp_path / "results" / "ray.log").read_text()
    for line in ("raylet says", "core_worker.cc", "creating tables", "a library's warning"):
        assert line in log
    assert "study line" not in log and "study warning" not in log


def trial(trial_id, name, **result):
    return SimpleNamespace(trial_id=trial_id, custom_trial_name=name, config={},
                           last_result=result)


def test_progress_writes_a_line_per_finished_trial(tmp_path, capsys):
    progress = StudyProgress(study(tmp_path), trials=3)
    first, second = trial("a", "d8-k1-w1-s0"), trial("b", "d8-k2-w1-s0")
    for t in (first, second):
        progress.on_trial_start(0, [], t)
    for epoch, error in ((1, 0.8), (2, 0.7)):
        first.last_result = {"epoch": epoch, "epochs_total": 2, "test_error": error,
                             "best_test_error": error, "time_total_s": 3.0 * epoch}
        progress.on_trial_result(0, [], first, first.last_result)
    progress.on_trial_complete(0, [], first)
    second.last_result = {"epoch": 1, "epochs_total": 2, "test_error": 0.9,
                          "best_test_error": 0.9, "time_total_s": 2.0}
    progress.on_trial_result(0, [], second, second.last_result)
    progress.on_trial_complete(0, [], second)  # stopped after 1 of 2 epochs
    third = trial("c", "d8-k2-w1-s0-lr1e+08")
    progress.on_trial_start(0, [], third)
    third.last_result = {"epoch": 1, "epochs_total": 2, "test_error": 1.0,
                         "diverged": "the loss became non-finite at step 3"}
    progress.on_trial_result(0, [], third, third.last_result)
    progress.on_trial_complete(0, [], third)
    progress.on_experiment_end([])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["done     d8-k1-w1-s0  2/2 epochs  test error 0.700 (best 0.700)  6 s",
                     "stopped  d8-k2-w1-s0  1/2 epochs  test error 0.900 (best 0.900)  2 s",
                     "diverged d8-k2-w1-s0-lr1e+08  1/2 epochs  the loss became non-finite at "
                     "step 3"]
    assert progress.study_bar.total == 4  # the epochs that ended trials skip are not coming


def test_the_time_estimate_of_an_n0_study_counts_its_epoch_budget(monkeypatch):
    """depth_vs_k with budget.epochs 1,700 trains at most 8 of its 200-epoch trials (no trial
    starts that would pass the budget): the estimate for running it on these CPUs counts those
    1,600 epochs, as the dry run's worst case does, not its 110-trial cap nor 9 trials."""
    path = Path("search_spaces/depth_vs_k.yaml")
    study = load_study(path, ["budget.epochs=1700"])
    # The measured step is not what this counts (the test above measures one).
    monkeypatch.setattr("orchestrator.study.placement.seconds_per_step", lambda cfg: 1.0)
    with pytest.raises(ConfigError) as error:
        check_place(study, LAPTOP, str(path))
    here = str(error.value).splitlines()[-1]
    assert "this study on these CPUs" in here and "(1,600 epochs, " in here
    assert worst_epochs(study)[0] == 1600

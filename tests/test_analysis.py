"""Locating n0: the analysis on known inputs, pair generation, the report and the lesion tool."""
import numpy as np
import pandas as pd
import pytest
import torch

from models.architecture import parameter_count
from models.multi_resnet import Architecture
from orchestrator.analysis.n0 import PAPER_TABLE_II, estimate_n0, find_pairs, pair_differences
from orchestrator.commands.report import main as report_main
from orchestrator.analysis.pairs import PairDesign, matched_multi

PNG = b"\x89PNG\r\n\x1a\n"


def constructed(seeds: int, noise: float = 0.2, crossing_at: float = 20.0,
                depths=(8, 14, 20, 26, 32), seed: int = 0) -> pd.DataFrame:
    """Pairs whose true difference is 0.1 * (crossing_at - depth), plus noise per run."""
    rng = np.random.default_rng(seed)
    rows = []
    for depth in depths:
        params = 100_000 * depth
        true_diff = 0.1 * (crossing_at - depth)
        for s in range(seeds):
            rows.append((3 * depth, 1, 1, params, s, 6.0 + rng.normal(0, noise)))
            rows.append((depth, 4, 1, params + 1000, s, 6.0 + true_diff + rng.normal(0, noise)))
    return pd.DataFrame(rows, columns=["depth", "k", "width", "params", "seed", "test_error"])


def test_known_crossing_is_found_with_an_interval():
    runs = constructed(seeds=10)
    pairs = find_pairs(runs)
    assert [m[0] for _, m in pairs] == [8, 14, 20, 26, 32]
    n0 = estimate_n0(runs, pairs, draws=500)
    assert n0.value == pytest.approx(20, abs=3)
    assert n0.low < 20 < n0.high
    assert n0.line().startswith("n0: ") and "95% CI" in n0.line()


def test_no_crossing_says_so_and_what_to_add():
    runs = constructed(seeds=3, crossing_at=60, noise=0.0)
    n0 = estimate_n0(runs, find_pairs(runs))
    assert n0.value is None and "add deeper pairs" in n0.line()
    runs = constructed(seeds=3, crossing_at=2, noise=0.0)
    assert "add shallower pairs" in estimate_n0(runs, find_pairs(runs)).line()


def test_paper_table_ii_places_n0_near_20():
    n0 = estimate_n0(PAPER_TABLE_II, find_pairs(PAPER_TABLE_II))
    assert 8 < n0.value < 30 and abs(n0.value - 20) < 5


def test_bootstrap_intervals_shrink_with_more_seeds():
    widths = []
    for seeds in (3, 30):
        runs = constructed(seeds=seeds, seed=1)
        diffs = pair_differences(runs, find_pairs(runs), draws=1000)
        widths.append((diffs.diff_high - diffs.diff_low).mean())
    assert widths[1] < 0.5 * widths[0]


def test_pair_generation_reproduces_the_papers_pairs():
    def params(blocks, k):
        return parameter_count(Architecture(blocks=blocks, k=k))  # the built net's (test_models.py)

    for deep, multi in [((4, 4, 3), (1, 1, 1)), ((11, 11, 11), (3, 3, 3)),
                        ((18, 18, 18), (5, 4, 5))]:
        assert matched_multi(deep, 4) == multi
        assert abs(params(multi, 4) / params(deep, 1) - 1) <= 0.03
    design = PairDesign(budgets=[0.29e6, 1.0e6, 1.7e6], factors=[2, 4]).configurations()
    for deep in design[::3]:
        for multi in design[design.index(deep) + 1:design.index(deep) + 3]:
            ratio = params(tuple(multi["blocks"]), multi["k"]) / params(tuple(deep["blocks"]), 1)
            assert abs(ratio - 1) <= 0.03


def test_report_from_csv_writes_markdown_and_figures(tmp_path, capsys):
    csv = tmp_path / "published.csv"
    constructed(seeds=5).to_csv(csv, index=False)
    assert report_main(["--from-csv", str(csv), "--out", str(tmp_path / "out"),
                        "--draws", "300"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("n0: ") for line in lines)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "n0:" in text and "median (mean ± std)" in text and "difference_vs_depth.png" in text
    assert (tmp_path / "out" / "difference_vs_depth.png").read_bytes().startswith(PNG)
    bad = tmp_path / "bad.csv"
    bad.write_text("depth,k\n8,1\n")
    assert report_main(["--from-csv", str(bad)]) == 2
    assert "missing columns" in capsys.readouterr().err


def test_a_report_from_mlflow_reads_the_runs_its_csv_holds(tmp_path, capsys):
    """The rows read back from MLflow (checked like a CSV's cells) give the report the same
    table as the CSV of the same runs, and their epoch histories a figure of their own."""
    from mlflow.tracking import MlflowClient

    from tests.sweeps import new_database

    runs = constructed(seeds=2).assign(flops=lambda r: 300 * r.params)
    runs.to_csv(tmp_path / "x.csv", index=False)
    uri = new_database(tmp_path)
    client = MlflowClient(uri)
    # The report logs itself to the parent run: its files in this test's folder, not ./mlruns.
    experiment = client.create_experiment("x", (tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={"study": "x"}).info.run_id
    for row in runs.itertuples():
        run = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
        for key, value in {"arch.depth": row.depth, "arch.k": row.k, "arch.width": row.width,
                           "params": row.params, "seed": row.seed, "flops": row.flops}.items():
            client.log_param(run, key, value)
        client.log_metric(run, "final_test_error", row.test_error / 100)
        for epoch in (1, 2):
            client.log_metric(run, "test_error", row.test_error / 100 + 0.1 / epoch, step=epoch)
    capsys.readouterr()
    assert report_main(["--from-csv", str(tmp_path / "x.csv"), "--draws", "300",
                        "--out", str(tmp_path / "from_csv")]) == 0
    assert report_main(["--experiment", "x", "--tracking-uri", uri, "--draws", "300",
                        "--out", str(tmp_path / "from_mlflow")]) == 0
    csv, mlflow = [(tmp_path / out / "report.md").read_text().split("![")[0]
                   for out in ("from_csv", "from_mlflow")]
    assert "n0: " in csv and mlflow == csv
    assert (tmp_path / "from_mlflow" / "error_vs_epoch.png").read_bytes().startswith(PNG)


def test_lesion_of_nothing_reproduces_the_models_error(tmp_path, capsys):
    """On the test images the checkpoint was evaluated on: synthetic data regenerated from the
    checkpoint's seed (3, not the default 0) and sizes."""
    from orchestrator.commands.lesion import main as lesion_main
    from orchestrator.commands.train import main as train_main

    assert train_main(["--dataset", "synthetic", "--depth", "8", "--k", "2", "--train-size",
                       "256", "--test-size", "128", "--batch-size", "64", "--epochs", "2",
                       "--seed", "3", "--precision", "fp32", "--device", "cpu",
                       "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    assert lesion_main([str(tmp_path / "ck" / "checkpoint.pt"), "--out",
                        str(tmp_path / "lesion")]) == 0
    table = pd.read_csv(tmp_path / "lesion" / "lesion.csv")
    state = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)
    assert table.test_error.iloc[0] == pytest.approx(state["metrics"]["test_error"], abs=1e-9)
    assert len(table) == 1 + 3 + 3 * 2  # nothing, 3 blocks, 2 functions of each
    assert (tmp_path / "lesion" / "lesion.png").read_bytes().startswith(PNG)
    from orchestrator.analysis.lesion_study import test_split
    from orchestrator.errors import CheckpointError
    from orchestrator.run.data import load_dataset

    split, _ = test_split(state["config"], None, 100, "ck")
    assert torch.equal(split.images, load_dataset("synthetic", None, 256, 128, seed=3)[1]
                       .images[:100])
    with pytest.raises(CheckpointError, match="tested on 128 images; give 1 to 128"):
        test_split(state["config"], None, 129, "ck")


def test_interval_covers_the_true_crossing_at_its_stated_rate():
    """Over 100 constructed studies (3 seeds, noise 0.2), the 95% interval contains the true
    crossing in at least 88 (a binomial 95% at n=100 falls below 88 with ~1% chance)."""
    hits = 0
    for seed in range(100):
        runs = constructed(seeds=3, noise=0.2, crossing_at=23.0, seed=seed)
        n0 = estimate_n0(runs, find_pairs(runs), draws=400)
        hits += n0.value is not None and n0.low <= 23.0 <= n0.high
    assert hits >= 88


def test_open_ended_interval_when_the_deepest_pair_is_unsure():
    runs = constructed(seeds=2, noise=0.3, crossing_at=30.0, seed=0)
    n0 = estimate_n0(runs, find_pairs(runs), draws=500)
    assert n0.value is not None and n0.high == np.inf and n0.width == np.inf
    assert "beyond the deepest pair" in n0.line()

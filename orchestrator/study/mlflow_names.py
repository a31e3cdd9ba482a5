"""The MLflow tags this project writes and reads back, in one place: the sweep writes them, the
resume, the report and `orchestrator.report` read them, and users filter runs by them in the
MLflow UI (`tags.architecture = 'd20-k4-w1'`)."""


class Tag:
    STUDY = "study"                  # on the parent run and every trial's run: the study's name
    TRIAL_ID = "trial_id"            # Ray Tune's trial id of a trial's run
    ARCHITECTURE = "architecture"    # the trial's architecture name (d20-k4-w1)
    FIDELITY = "fidelity"            # 1.0, or a short schedule's fraction of the epochs
    SEED = "seed"
    LAYOUT = "parallel_layout"       # the mesh a trial ran on
    GIT_COMMIT = "git_commit"
    RESULTS_DIR = "results_dir"      # on the parent run: where the study's results are
    FAILURE = "failure"              # why a trial failed
    STOPPED_EARLY = "stopped_early"  # stopped by ASHA (the run ends KILLED)
    FORGOTTEN = "forgotten"          # a run a restored study trained again (deleted)
    EXTENDED = "extended"            # on the parent run: how the study grew
    N0 = "n0"                        # on the parent run: the n0 line of the report
    N0_SEARCH = "n0_search"          # on the parent run: why the n0 search stopped

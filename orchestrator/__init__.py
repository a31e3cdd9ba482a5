"""multires' orchestrator, in layers; each may import the ones above it (tests/test_layers.py):

    errors.py, results.py   what goes wrong, and the names of what a run reports
    storage.py              the places written to: checked at start, local or a URI
    parallel/               data x pipeline x branch parallelism around an unmodified model
                            (it reads the run schema, run/config.py)
    run/                    one training run (one process, or one rank of a mesh)
    analysis/               n0 statistics, the report, lesion studies
    cluster/                Ray: connecting, a run's ranks as Ray Train workers
    study/                  studies: schema, searchers, trials, MLflow tracking, the sweep
    train.py sweep.py report.py lesion.py summary.py   the commands (cli.py: what they share)

`models/` (the networks) is below all of it.
"""

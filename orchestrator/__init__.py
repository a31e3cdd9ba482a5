"""multires' orchestrator, in layers; each may import the ones above it (tests/test_layers.py):

    errors.py, results.py   what goes wrong, and the names of what a run reports
    storage.py              the places written to: checked at start, local or a URI
    compat.py               the private Ray and MLflow names used, in one place
    costs.py                what training costs: FLOPs, GPU hours, an n0 study's most epochs
    trust.py                Ray's pickled state in a results folder: signed, checked on resume
    parallel/               data x pipeline x branch parallelism around an unmodified model
                            (handed the run's config; its own schema: the mesh's degrees)
    run/                    one training run (one process, or one rank of a mesh)
    analysis/               matched pairs, n0 statistics and the n0 policy, the report, lesions
    cluster/                Ray: connecting, a run's ranks as Ray Train workers
    study/                  studies: schema, searchers, trials, MLflow tracking, the sweep
    commands/               the commands: train, sweep, report, lesion, summary (cli.py: what
                            they share)

`models/` (the networks) is below all of it.
"""

"""The Optuna samplers a study can name (`searcher.sampler`), each a factory of (seed, grid):
adding one is one entry here. `grid` holds every searched key's values (the grid sampler's
grid); the others ignore it. The n0 searcher is not an Optuna sampler (n0_search.py).
Optuna loads when a sampler is built: a study file validates without it (settings.py reads the
names)."""
from __future__ import annotations


def _tpe(seed: int, grid: dict):
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def _random(seed: int, grid: dict):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _grid(seed: int, grid: dict):
    import optuna

    return optuna.samplers.GridSampler(grid, seed=seed)


OPTUNA_SAMPLERS = {"tpe": _tpe, "random": _random, "grid": _grid}

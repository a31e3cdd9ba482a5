"""A study that grows: the same command on the same results folder with a larger `trials` or
`budget.epochs`, more seeds, depths or pairs, or a smaller `n0.target_width` continues the study
instead of starting it again.

As Optuna's `study.optimize` called again on the same storage, the continuation is a new Ray
Tune experiment in the study's folder whose searcher is seeded with every finished trial (the n0
policy replays its log; an Optuna sampler learns the results as evaluated points): Tune's
`Tuner.restore` brings back the searcher and the number of trials that were pickled with the
first experiment and cannot take new ones. The finished trials are summarized once, as data, in
`multires_prior.json` (rows for the report, the searcher's state, the extensions so far), and
the first experiment's Tune state files are removed, so that only the continuation can be
restored (a driver killed during it resumes it with `Tuner.restore`). The MLflow parent run goes
on, tagged with what was extended.

What changes a trained trial (the recipe, the dataset, the space's values of trained nets, the
searcher, the statistics) is refused, naming the keys."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any, Callable

import pandas as pd

from orchestrator.study.mlflow_names import Tag
from orchestrator.errors import ConfigError, short
from orchestrator.storage import filesystem, join, read_text, shown, write_text
from orchestrator.study.config import StudyConfig, set_dotted
from orchestrator.study.n0_search import N0Search, continuation_plan
from orchestrator.study.search_state import JsonStateSearcher
from orchestrator.trust import unpickled_files

PRIOR_FILE = "multires_prior.json"


def _more(old: Any, new: Any) -> bool:
    return new > old


def _fewer(old: Any, new: Any) -> bool:
    return new < old


def _lifted(old: Any, new: Any) -> bool:  # a cap raised, or removed (None: no cap)
    return old is not None and (new is None or new > old)


def _lowered(old: Any, new: Any) -> bool:  # a floor lowered, or removed
    return old is not None and (new is None or new < old)


def _superset(old: Any, new: Any) -> bool:
    """More values, every old one kept (lists of values, lists or mappings)."""
    if not isinstance(old, list) or not isinstance(new, list):
        return False
    seen = {json.dumps(v, sort_keys=True) for v in new}
    return len(new) > len(old) and all(json.dumps(v, sort_keys=True) in seen for v in old)


# What an extension may change, and how it must change: each grows the study without touching a
# trained trial.
GROWTH: dict[str, Callable[[Any, Any], bool]] = {
    "trials": _more, "budget.epochs": _lifted, "budget.max_params": _lifted,
    "budget.min_params": _lowered, "n0.target_width": _fewer, "seeds": _superset,
    "pairs.deep": _superset, "pairs.factors": _superset, "configurations": _superset,
    "space.*.choices": _superset, "space.*.low": _fewer, "space.*.high": _more,
}
# What may change along with an extension: how trials run, not what they train.
OPERATIONAL = ("description", "concurrency", "resources.*", "mlflow.outage_wait_s",
               "mlflow.log_checkpoint")


def flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys; lists are values."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class Change:
    """How a study file differs from the one its results folder was trained with."""
    grown: list[str] = field(default_factory=list)     # "trials 12 -> 20"
    allowed: list[str] = field(default_factory=list)   # operational keys, changed
    refused: list[str] = field(default_factory=list)   # keys that alter (or shrink) the study


def _shown(value: Any) -> str:
    return short("unset" if value is None else json.dumps(value), 40)


def classify(old: dict, new: dict) -> Change:
    """Each differing key of two studies' configurations (`StudyConfig.model_dump(mode="json")`)
    as growth, operational, or refused (anything else, or a growth key that shrinks)."""
    before, after = flat(old), flat(new)
    change = Change()
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        line = f"{key} {_shown(a)} -> {_shown(b)}"
        rule = next((r for pattern, r in GROWTH.items() if fnmatch(key, pattern)), None)
        if rule is not None and key in before and key in after and rule(a, b):
            change.grown.append(line)
        elif any(fnmatch(key, pattern) for pattern in OPERATIONAL):
            change.allowed.append(line)
        else:
            change.refused.append(line)
    return change


def check_extension(old: dict | None, new: dict, name: str, results: str) -> Change:
    """The change from the trained study to this one, if it is an extension; otherwise one line
    naming the keys and the fix."""
    where = f"{shown(results)} holds study {name}"
    if old is None:  # a folder from before extensions were possible
        raise ConfigError(f"{where} with a different configuration; use another "
                          f"--storage-path or remove that folder")
    change = classify(old, new)
    if change.refused:
        raise ConfigError(f"{where} trained with other settings: {'; '.join(change.refused)} "
                          f"(an extension only grows trials, budget.epochs, seeds, depths or "
                          f"pairs, or narrows n0.target_width); put them back, or use another "
                          f"--storage-path for a new study")
    if not change.grown:
        raise ConfigError(f"{where} with other {'; '.join(change.allowed)} and nothing that "
                          f"grows it; put them back, or grow trials, budget.epochs, seeds, depths "
                          f"or pairs to extend it")
    return change


# ------------------------------------------------------------------------- the finished trials

@dataclass
class Prior:
    """The trials a continuation starts from (`multires_prior.json`): made for the study whose
    configuration hash is `digest`."""
    digest: str
    extensions: list[str]        # one line per extension, oldest first
    rows: list[dict]             # the sweep's summary rows of every finished trial
    searcher: dict | None        # the searcher's saved state (JSON) when the last part ended

    def trial_ids(self) -> frozenset[str]:
        return frozenset(str(r["trial"]) for r in self.rows)


ROW_KEYS = ("trial", "architecture", "seed", "fidelity", "depth", "k", "width", "params",
            "flops", "epochs", "best_test_error", "final_test_error", "time_s", "status",
            "history")


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def write_prior(results: str, prior: Prior) -> None:
    rows = [{**r, "history": None if r["history"] is None else r["history"].values.tolist()}
            for r in prior.rows]
    write_text(join(results, PRIOR_FILE), json.dumps(
        {"for": prior.digest, "extensions": prior.extensions, "rows": rows,
         "searcher": prior.searcher}, default=_plain, allow_nan=True))


def read_prior(results: str) -> Prior | None:
    """The folder's prior trials, None if it has none; read back as data and checked."""
    place = join(results, PRIOR_FILE)
    text = read_text(place, fix=f"remove {shown(results)} to start the study again")
    if text is None:
        return None
    try:
        data = json.loads(text)
        rows = [{**{k: r[k] for k in ROW_KEYS}, "history": None if r["history"] is None else
                 pd.DataFrame(r["history"], columns=["epoch", "test_error"], dtype=float)}
                for r in data["rows"]]
        prior = Prior(data["for"], [str(e) for e in data["extensions"]], rows, data["searcher"])
        if not isinstance(prior.digest, str) or not isinstance(prior.searcher, (dict, type(None))):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        raise ConfigError(f"{shown(place)} is not a study's finished trials (truncated or "
                          f"edited); remove {shown(results)} to start the study again") from None
    return prior


def prior_for(results: str, digest: str) -> Prior | None:
    """The finished trials of the earlier parts of the study `digest`, if it was extended."""
    prior = read_prior(results)
    return prior if prior is not None and prior.digest == digest else None


def tune_state_files(results: str) -> list[str]:
    """The Tune experiment's own state in the folder (not its trials'), tuner.pkl first."""
    names = [n for n in unpickled_files(results) if "/" not in n]
    return sorted(names, key=lambda n: n != "tuner.pkl")


def saved_searcher(results: str, names: list[str]) -> dict | None:
    """The searcher's last saved state (JSON, signed like every state file), None if none."""
    saved = sorted(n for n in names if fnmatch(n, "searcher-state-*.pkl"))
    if not saved:
        return None
    try:
        return json.loads(read_text(join(results, saved[-1])) or "null")
    except ValueError:
        raise ConfigError(f"{saved[-1]} in {shown(results)} is not a searcher's state; remove "
                          f"{shown(results)} to start the study again") from None


def begin(results: str, state: dict, digest: str, change: Change,
          finished_rows: Callable[[], list[dict]]) -> Prior:
    """Close the study's finished part and make the continuation's starting point: its rows
    (`finished_rows`: the last Tune experiment's) and searcher state saved as data, then the old
    experiment's state files removed. Safe to repeat after a kill at any point."""
    prior = prior_for(results, digest)
    if prior is not None:  # begun before, then killed: the finished part is already saved
        return prior
    earlier = prior_for(results, state["config_hash"])
    names = tune_state_files(results)
    searcher = saved_searcher(results, names) or (earlier.searcher if earlier else None)
    rows = (earlier.rows if earlier else []) + finished_rows()
    prior = Prior(digest, (earlier.extensions if earlier else []) + ["; ".join(change.grown)],
                  rows, searcher)
    write_prior(results, prior)
    fs, root = filesystem(results)
    for name in names:  # tuner.pkl first: from here on nothing old can be restored
        fs.delete_file(f"{root.rstrip('/')}/{name}")
    return prior


def seeded(searcher, prior: Prior | None):
    """The continuation's searcher: it has learnt every finished trial of `prior`."""
    if prior is None or prior.searcher is None:
        return searcher
    return ContinuedSearch(searcher, prior.searcher)


class ContinuedSearch(JsonStateSearcher):
    """A study's searcher seeded with the finished trials of its earlier parts (the n0 policy
    replays its log, `N0Policy.replay`; an Optuna sampler learns the results as evaluated
    points), pickled seeded with the Tune experiment. Its saved state is the inner searcher's,
    which holds the seed too: a restore reloads it into an unseeded copy, so nothing is learnt
    twice."""

    def __init__(self, searcher: JsonStateSearcher, seed: dict):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        if seed.get("running"):  # a study that ended has none
            raise ConfigError("the study's earlier part has trials still running; run it to "
                              "its end before extending it")

        if isinstance(searcher, N0Search):  # the earlier parts' looks spent alpha too
            searcher.policy.plan = continuation_plan(searcher.policy, seed)
        self.blank = copy.deepcopy(searcher)
        self.inner = searcher
        self.load_state(seed)

    def load_state(self, data: dict) -> None:
        self.inner = copy.deepcopy(self.blank)
        if isinstance(self.inner, N0Search):  # the seed was planned with the smaller budget
            data = {**data, "plan": self.inner.state()["plan"]}
        self.inner.load_state(data)

    def state(self) -> dict:
        return self.inner.state()

    def suggest(self, trial_id: str):
        return self.inner.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        self.inner.on_trial_complete(trial_id, result, error)


def spent_epochs(prior: Prior) -> float:
    return float(sum(r["epochs"] or 0 for r in prior.rows if not _nan(r["epochs"])))


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def extended_line(name: str, prior: Prior) -> str:
    """What the console and the report say about an extended study."""
    return (f"study {name} extended ({' | then '.join(prior.extensions)}): "
            f"{len(prior.rows)} trials kept from before, none trained again")


def mark_parent(parent, prior: Prior, study_text: str) -> None:
    """The parent run goes on: tagged with its extensions, each one's study file logged
    beside the first (`study.yaml`)."""
    client, run_id = parent.client, parent.run_id
    client.set_tag(run_id, Tag.EXTENDED, short(" | then ".join(prior.extensions), 4000))
    client.log_text(run_id, study_text, f"study.extension-{len(prior.extensions)}.yaml")


def last_state(results: str, state: dict) -> dict | None:
    """The folder's searcher state when its study last saved it (read as data: the dry run
    reads the folder, and trusts nothing in it)."""
    data = saved_searcher(results, tune_state_files(results))
    prior = prior_for(results, state["config_hash"])
    if data is None and prior is not None:
        data = prior.searcher
    return data if isinstance(data, dict) else None


def trained_so_far(data: dict | None, epochs: int) -> tuple[int, float]:
    """(trials, epochs) a study has trained, from its searcher's state (`last_state`); `epochs`:
    a trial's, where the searcher does not count them."""
    if data is None:
        return 0, 0.0
    if "log" in data:  # the n0 policy's log: every finished trial with its cost
        log = data["log"]
        return len(log), float(sum(r["cost"] for r in log))
    return len(data.get("taken", {})), float(len(data.get("taken", {})) * epochs)


def earlier_study(study, old: dict):
    """The study as its results folder was trained: `study` with the keys an extension changed
    put back to their `old` values (from `StudyState.config`)."""
    data = study.model_dump(mode="json", exclude_unset=True)
    before, now = flat(old), flat(study.model_dump(mode="json"))
    for key in sorted(before):
        if before[key] != now.get(key):
            set_dotted(data, key, before[key])
    return StudyConfig(**data)

"""What every searcher of a study shares: the Tune `Searcher` whose saved state is JSON (written
whole or not at all), never pickle, so a resumed study reads back only data."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ray.tune.search import Searcher

WAIT = None  # Tune asks again later


class JsonStateSearcher(Searcher):
    """`save`/`restore` (Tune calls them with its experiment state) write and read `state()` as
    JSON, by write-then-rename; a subclass rebuilds itself from that data in `load_state`."""

    def state(self) -> dict:
        raise NotImplementedError

    def load_state(self, data: dict) -> None:
        raise NotImplementedError

    def save(self, checkpoint_path: str) -> None:
        path = Path(checkpoint_path)
        staged = path.with_name(f".{path.name}.tmp")
        staged.write_text(json.dumps(self.state(), allow_nan=False))
        os.replace(staged, path)  # whole or absent, even if killed here

    def restore(self, checkpoint_path: str) -> None:
        self.load_state(json.loads(Path(checkpoint_path).read_text()))

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # set at construction from the study

"""Comparisons over stored results in a metric the state keeps no column for: the top-5 error of ImageNet
trials, read from their result records, with the paper's top-5 figures in the paper column."""
from __future__ import annotations

import pytest

from orchestrator.grids import expand_grid, load_grid
from orchestrator.results import BadRequest, comparison
from orchestrator.state import StateStore

GRID = {"name": "in", "dataset": "imagenet", "recipe": "smoke", "depths": [152], "variants": ["original",
        "full_preact"], "seeds": 3}
# (test_error, test_error_top5) per variant and seed
MEASURED = {"original": [(21.5, 5.6), (21.2, 5.4), (21.4, 5.5)], "full_preact": [(21.0, 5.3), (21.1, 5.5), (20.9, 5.4)]}


@pytest.fixture
def store(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    spec = load_grid(GRID)
    trials = expand_grid(spec)
    store.register_grid(spec.grid_id(), spec.name, spec.model_dump(mode="json"), trials)
    for t in trials:
        top1, top5 = MEASURED[t.variant][t.seed]
        assert store.claim(t.key, "w")
        store.finish(t.key, "w", {"status": "finished", "test_error": top1, "test_error_top5": top5,
                                  "train_loss": 1.0, "history": []})
    return store, spec.grid_id()


@pytest.mark.parametrize("metric,index,paper", [("test_error", 0, {"original": 21.3, "full_preact": 21.1}),
                                                ("test_error_top5", 1, {"original": 5.5, "full_preact": 5.5})])
def test_top1_and_top5_tables_carry_the_papers_figures(store, metric, index, paper):
    doc = comparison(*store, metric=metric)
    rows = {r["variant"]: r for r in doc["rows"]}
    for variant, values in MEASURED.items():
        assert rows[variant]["n"] == 3
        assert rows[variant]["mean"] == pytest.approx(sum(v[index] for v in values) / 3)
        assert rows[variant]["paper"] == paper[variant]
    assert rows["original"]["setting"] == {"dataset": "imagenet", "depth": 152}


def test_unknown_metric_lists_the_choices(store):
    with pytest.raises(BadRequest, match="choose one of: test_error, test_error_top5, train_loss, train_error"):
        comparison(*store, metric="top1")

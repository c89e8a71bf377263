"""The state store's contract: atomic claims across processes, immutable results, retries, takeover."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from orchestrator.grids import expand_grid, load_grid
from orchestrator.state import Meta, StateError, StateStore

GRID = {"name": "g", "dataset": "synthetic", "subset": 256, "recipe": "smoke", "depths": [8], "block": "basic",
        "width": 4, "variants": ["original", "full_preact"], "seeds": 2}


@pytest.fixture
def store(tmp_path):
    return StateStore(f"sqlite:///{tmp_path / 'state.db'}")


def registered(store, grid=GRID):
    spec = load_grid(grid)
    trials = expand_grid(spec)
    store.register_grid(spec.grid_id(), spec.name, spec.model_dump(mode="json"), trials)
    return spec.grid_id(), trials


def _claim_worker(url, key, owner, out):
    out.put((owner, StateStore(url).claim(key, owner)))


def test_claim_is_atomic_across_processes(store):
    _, trials = registered(store)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_worker, args=(store.url, trials[0].key, f"p{i}", out)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    winners = [owner for owner, won in (out.get(timeout=5) for _ in procs) if won]
    assert len(winners) == 1
    assert store.trial(trials[0].key).owner == winners[0]


def test_result_is_written_once_and_immutable(store):
    grid_id, trials = registered(store)
    key = trials[0].key
    assert store.claim(key, "a")
    assert store.finish(key, "a", {"status": "finished", "test_error": 12.5, "train_loss": 0.3, "history": []})
    assert not store.claim(key, "b")
    assert not store.finish(key, "a", {"status": "finished", "test_error": 99.0, "train_loss": 9.0})
    assert store.trial(key).test_error == 12.5
    assert store.counts(grid_id)["finished"] == 1 and store.counts(grid_id)["queued"] == 3


def test_failures_retry_then_error_and_rerun_requeues(store):
    grid_id, trials = registered(store)
    key = trials[1].key
    for expected in ("queued", "queued", "error"):
        assert store.claim(key, "a")
        assert store.fail(key, "a", "boom", max_retries=2) == expected
    assert [a.outcome for a in store.attempts(key)] == ["error"] * 3
    registered(store)  # rerunning the grid gives failed trials a fresh set of attempts
    assert store.trial(key).status == "queued" and store.trial(key).attempts == 0


def test_stale_owner_is_taken_over_and_loses_its_write(store):
    _, trials = registered(store)
    key = trials[0].key
    assert store.claim(key, "old")
    assert not store.claim(key, "new", stale_after=60)
    time.sleep(0.05)
    assert store.claim(key, "new", stale_after=0.01)
    assert not store.finish(key, "old", {"status": "finished", "test_error": 1.0})
    assert store.finish(key, "new", {"status": "finished", "test_error": 2.0})
    assert store.trial(key).test_error == 2.0


def test_heartbeat_keeps_a_trial(store):
    _, trials = registered(store)
    key = trials[0].key
    assert store.claim(key, "a")
    time.sleep(0.05)
    store.heartbeat("a", [key])
    assert not store.claim(key, "b", stale_after=0.04)


def test_release_and_cancel(store):
    grid_id, trials = registered(store)
    assert store.claim(trials[0].key, "a")
    store.release("a", [trials[0].key])
    assert store.trial(trials[0].key).status == "queued" and store.trial(trials[0].key).attempts == 0
    assert store.cancel_grid(grid_id) == 4
    assert store.is_cancelled(grid_id) and store.counts(grid_id)["cancelled"] == 4


def test_shared_trials_across_grids(store):
    grid_a, trials = registered(store)
    grid_b, more = registered(store, {**GRID, "name": "h", "seeds": 3})
    assert len(store.grid_trials(grid_b)) == 6 and len({t.key for t in more} - {t.key for t in trials}) == 2
    assert store.find_grid("h").id == grid_b


def test_newer_schema_is_refused(store):
    with store.sessions.begin() as s:
        s.get(Meta, "schema_version").value = "99"
    with pytest.raises(StateError, match="newer than this Ablate"):
        StateStore(store.url)


def test_results_table_order_does_not_depend_on_registration_order(store):
    """The bootstrap CI resamples by position: the same results must come back in the same order."""
    spec = load_grid({**GRID, "seeds": 4})
    trials = expand_grid(spec)
    store.register_grid(spec.grid_id(), spec.name, spec.model_dump(mode="json"), list(reversed(trials)))
    table = store.results_table(spec.grid_id()).to_pylist()
    order = [(r["variant"], r["seed"]) for r in table]
    assert order == sorted(order) and len(order) == 8


def test_mlflow_runs_belong_to_trials_and_parents_to_grid_names(store):
    """One child run per trial whichever grid runs it (the first saved wins); one parent per grid name."""
    grid_a, trials = registered(store)
    grid_b, _ = registered(store, {**GRID, "seeds": 3})  # the same name, grown: another grid id
    grid_c, _ = registered(store, {**GRID, "name": "h"})
    key = trials[0].key
    assert store.set_trial_run(key, "run-1") == "run-1"
    assert store.set_trial_run(key, "run-2") == "run-1"  # a second driver's run loses
    assert {t["mlflow_run_id"] for t in store.grid_trials(grid_c) if t["key"] == key} == {"run-1"}

    assert store.grid_run(grid_a) is None
    store.set_grid_run(grid_a, "parent-g")
    assert store.grid_run(grid_b) == "parent-g" and store.grid_run(grid_c) is None
    assert store.run_grids("parent-g") == [grid_a, grid_b]

    # An errored trial queued again by a new registration is synced again when it ends.
    store.set_trial_synced(key)
    assert store.claim(key, "a") and store.fail(key, "a", "boom", max_retries=0) == "error"
    registered(store)
    assert [t["mlflow_synced"] for t in store.grid_trials(grid_a) if t["key"] == key] == [False]

"""The state store's contract (orchestrator/state/base.py), run against sqlite and PostgreSQL alike, and its
schema under migrations: models and revisions agree, and databases from before migrations upgrade in place."""
from __future__ import annotations

import json
import multiprocessing as mp
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.orm import Session

from orchestrator.grids import expand_grid, load_grid
from orchestrator.state import BaseStateStore, StateError, StateStore, get_store, migrate
from orchestrator.state.models import VERSION_TABLE, Base
from orchestrator.state.sql import open_engine
from tests import state_v1

GRID = {"name": "g", "dataset": "synthetic", "subset": 256, "recipe": "smoke", "depths": [8], "block": "basic",
        "width": 4, "variants": ["original", "full_preact"], "seeds": 2}
RESULT = {"status": "finished", "test_error": 12.5, "train_loss": 0.3, "train_error": 4.0, "history": [],
          "test_size": 10000, "precision": "fp32", "test_error_top5": 3.5}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    """A new, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres").create_database(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(url) -> BaseStateStore:
    return get_store(url)


@pytest.fixture
def clock(monkeypatch):
    """The store's clock, moved by hand: staleness is tested without racing the real one."""
    from orchestrator.state import base
    now = [1_000_000.0]
    monkeypatch.setattr(base, "time", SimpleNamespace(time=lambda: now[0]))

    def advance(seconds: float) -> None:
        now[0] += seconds
    return advance


def registered(store, grid=GRID):
    spec = load_grid(grid)
    trials = expand_grid(spec)
    store.register_grid(spec.grid_id(), spec.name, spec.model_dump(mode="json"), trials)
    return spec.grid_id(), trials


def snapshot_of(store, key: str) -> tuple:
    row = store.trial(key)
    return row.status, row.result, row.test_error, row.train_loss, row.train_error, row.owner, row.updated_at


# ------------------------------------------------------------------------------------------------ claims
def _claim_all(url: str, keys: list[str], owner: str, threads: int) -> list[str]:
    """Claim every key from `threads` threads of one store, each in its own order; returns the keys won."""
    store = StateStore(url)
    start = threading.Barrier(threads)

    def claim(i: int) -> list[str]:
        order = random.Random(f"{owner}-{i}").sample(keys, len(keys))
        start.wait()
        return [k for k in order if store.claim(k, f"{owner}-t{i}")]

    with ThreadPoolExecutor(threads) as pool:
        return [k for won in pool.map(claim, range(threads)) for k in won]


def _race(store, keys: list[str], claim, size: int, main_size: int) -> None:
    """`claim(url, keys, owner, size)` in three spawned processes and in this one at once: every trial must be
    taken exactly once, by one attempt of its owner."""
    with mp.get_context("spawn").Pool(3) as pool:
        runs = [pool.apply_async(claim, (store.url, keys, f"p{i}", size)) for i in range(3)]
        won = claim(store.url, keys, "main", main_size) + [k for r in runs for k in r.get(120)]
    assert sorted(won) == sorted(keys)  # every trial once: none twice, none lost
    for key in keys:
        row = store.trial(key)
        assert row.status == "running" and row.attempts == 1
        assert [a.owner for a in store.attempts(key)] == [row.owner]


def test_each_trial_is_claimed_once_by_threads_and_processes(store):
    grid_id, trials = registered(store, {**GRID, "seeds": 4})
    _race(store, [t.key for t in trials], _claim_all, 4, 4)
    assert store.counts(grid_id)["running"] == 8


def _claim_batches(url: str, keys: list[str], owner: str, size: int) -> list[str]:
    """Claim `keys` in shuffled batches of `size` (as a driver claims the trials for its free slots)."""
    store = StateStore(url)
    order = random.Random(owner).sample(keys, len(keys))
    return [k for i in range(0, len(order), size) for k in store.claim_many(order[i:i + size], owner)]


def test_batched_claims_of_overlapping_sets_take_each_trial_once(store):
    grid_id, trials = registered(store, {**GRID, "seeds": 16})
    keys = [t.key for t in trials]
    _race(store, keys, _claim_batches, 5, 7)
    assert store.claim_many(keys, "late") == [] and store.claim_many([], "late") == []


def test_batched_finish_stores_only_what_the_owner_holds(store, clock):
    grid_id, trials = registered(store)
    a, b, c, d = (t.key for t in trials)
    assert sorted(store.claim_many([a, b, c], "x")) == sorted([a, b, c])
    clock(61)
    assert store.claim_many([c, d], "y", stale_after=60) == sorted([c, d])  # c taken over from x
    results = {a: RESULT, b: {**RESULT, "status": "diverged", "test_error": 90.0}, c: RESULT, d: RESULT}
    assert sorted(store.finish_many("x", results)) == sorted([a, b])
    assert (store.trial(a).status, store.trial(a).test_error, store.trial(a).test_size) == ("finished", 12.5, 10000)
    assert (store.trial(b).status, store.trial(b).test_error, store.trial(b).owner) == ("diverged", 90.0, None)
    assert json.loads(store.trial(b).result)["status"] == "diverged"
    assert store.trial(c).status == "running" and store.trial(c).owner == "y"
    assert [(x.owner, x.outcome) for x in store.attempts(c)] == [("x", None), ("y", None)]
    assert [x.outcome for x in store.attempts(b)] == ["diverged"]
    assert store.finish_many("y", {c: RESULT, d: RESULT}) == sorted([c, d])
    assert store.finish_many("y", {c: {**RESULT, "test_error": 1.0}}) == []  # immutable once finished
    assert store.counts(grid_id)["finished"] == 3
    with pytest.raises(ValueError):
        store.finish_many("y", {a: {"status": "error"}})


def test_runs_and_syncs_in_batches_and_the_backlog_counts_ended_unsynced_trials(store):
    grid_id, trials = registered(store)
    a, b, c, _ = (t.key for t in trials)
    assert store.set_trial_runs({a: "run-a"}) == {a: "run-a"}
    assert store.set_trial_runs({a: "run-x", b: "run-b"}) == {a: "run-a", b: "run-b"}  # the first saved wins
    assert store.unsynced(grid_id) == 0  # nothing ended yet
    store.claim_many([a, b, c], "x")
    store.finish_many("x", {a: RESULT, b: RESULT})
    assert store.fail(c, "x", "boom", max_retries=0) == "error"
    assert store.unsynced(grid_id) == 3
    store.set_trials_synced([a, c])
    assert store.unsynced(grid_id) == 1
    assert [t["key"] for t in store.grid_trials(grid_id) if not t["mlflow_synced"]] != []


def test_a_finished_trial_is_immutable(store, clock):
    grid_id, trials = registered(store)
    key = trials[0].key
    assert store.claim(key, "a")
    assert store.finish(key, "a", RESULT)
    before = snapshot_of(store, key)
    assert before[:5] == ("finished", json.dumps(RESULT), 12.5, 0.3, 4.0)
    clock(1)
    assert not store.claim(key, "b", stale_after=0)
    assert not store.finish(key, "a", {**RESULT, "test_error": 99.0})
    assert store.fail(key, "a", "late", max_retries=3) == "finished"
    store.release("a", [key], status="queued")
    store.heartbeat("a", [key])
    registered(store)
    store.cancel_grid(grid_id)
    assert snapshot_of(store, key) == before
    assert [a.outcome for a in store.attempts(key)] == ["finished"]


def test_stale_owner_is_taken_over_and_loses_its_write(store, clock):
    _, trials = registered(store)
    key = trials[0].key
    assert store.claim(key, "old")
    clock(59)
    assert not store.claim(key, "new", stale_after=60)
    clock(2)
    assert store.claim(key, "new", stale_after=60)
    assert not store.finish(key, "old", {"status": "finished", "test_error": 1.0})
    assert store.fail(key, "old", "lost", max_retries=0) == "running"  # not the owner: nothing changes
    store.release("old", [key])
    assert store.trial(key).owner == "new"
    assert store.finish(key, "new", {"status": "finished", "test_error": 2.0})
    assert store.trial(key).test_error == 2.0 and store.trial(key).attempts == 2
    assert [(a.owner, a.outcome) for a in store.attempts(key)] == [("old", None), ("new", "finished")]


def test_heartbeat_keeps_a_trial_for_its_owner_only(store, clock):
    _, trials = registered(store)
    key = trials[0].key
    assert store.claim(key, "a")
    claimed_at = store.trial(key).heartbeat_at
    clock(50)
    store.heartbeat("b", [key])  # someone else's beat does not keep it
    assert store.trial(key).heartbeat_at == claimed_at
    store.heartbeat("a", [key])
    clock(50)
    assert not store.claim(key, "b", stale_after=60)  # 100 s since the claim, 50 since the beat
    clock(11)
    assert store.claim(key, "b", stale_after=60)


def test_failures_retry_then_error_and_rerun_requeues(store):
    _, trials = registered(store)
    key = trials[1].key
    for expected in ("queued", "queued", "error"):
        assert store.claim(key, "a")
        assert store.fail(key, "a", "boom", max_retries=2) == expected
    assert [a.outcome for a in store.attempts(key)] == ["error"] * 3
    assert store.trial(key).error == "boom"
    registered(store)  # rerunning the grid gives failed trials a fresh set of attempts
    row = store.trial(key)
    assert (row.status, row.attempts, row.error) == ("queued", 0, None)


def test_release_hands_running_trials_back(store):
    _, trials = registered(store)
    a, b = trials[0].key, trials[1].key
    assert store.claim(a, "me") and store.claim(b, "me")
    store.release("other", [a, b])  # not theirs: nothing happens
    assert store.trial(a).status == store.trial(b).status == "running"
    store.release("me", [a])
    store.release("me", [b], status="cancelled")
    assert (store.trial(a).status, store.trial(a).attempts, store.trial(a).owner) == ("queued", 0, None)
    assert (store.trial(b).status, store.trial(b).attempts) == ("cancelled", 1)
    assert [x.outcome for x in store.attempts(a)] == ["queued"]
    assert store.claim(a, "next")


def test_cancel_stops_queued_trials_and_rerun_requeues(store):
    grid_id, trials = registered(store)
    assert store.claim(trials[0].key, "a")
    assert store.cancel_grid(grid_id) == 3  # queued ones; the running one is stopped by its owner
    assert store.is_cancelled(grid_id) and store.counts(grid_id)["cancelled"] == 3
    assert not store.claim(trials[1].key, "b")
    registered(store)
    assert not store.is_cancelled(grid_id) and store.counts(grid_id)["queued"] == 3


# ------------------------------------------------------------------------------------------ registration
def test_register_grid_is_idempotent_and_grows(store):
    grid_id, trials = registered(store)
    assert store.claim(trials[0].key, "a") and store.finish(trials[0].key, "a", RESULT)
    before = store.grid_trials(grid_id)
    registered(store)
    assert store.grid_trials(grid_id) == before
    assert len(store.grids()) == 1 and store.counts(grid_id)["finished"] == 1

    spec = load_grid({**GRID, "seeds": 3})
    more = expand_grid(spec)
    store.register_grid(grid_id, spec.name, spec.model_dump(mode="json"), trials + more)  # the same grid, grown
    rows = {t["key"]: t for t in store.grid_trials(grid_id)}
    assert set(rows) == {t.key for t in more} and rows[trials[0].key]["status"] == "finished"
    assert json.loads(store.grid(grid_id).spec)["seeds"] == 3  # the latest spec is kept


def test_trials_are_shared_across_grids(store):
    grid_a, trials = registered(store)
    grid_b, more = registered(store, {**GRID, "name": "h", "seeds": 3})
    assert len(store.grid_trials(grid_b)) == 6 and len({t.key for t in more} - {t.key for t in trials}) == 2
    assert store.find_grid("h").id == grid_b and store.find_grid(grid_a).name == "g"
    assert store.claim(trials[0].key, "a") and store.finish(trials[0].key, "a", RESULT)
    assert store.counts(grid_a)["finished"] == store.counts(grid_b)["finished"] == 1


def test_concurrent_registrations_of_overlapping_grids_all_succeed(store):
    grids = [load_grid({**GRID, "name": f"g{i}", "seeds": 6}) for i in range(4)]
    work = [(spec, expand_grid(spec)) for spec in grids]
    start = threading.Barrier(len(work))

    def register(item):
        spec, trials = item
        start.wait()
        store.register_grid(spec.grid_id(), spec.name, spec.model_dump(mode="json"), random.sample(trials, 12))

    with ThreadPoolExecutor(len(work)) as pool:
        list(pool.map(register, work))  # raises what any of them raised
    assert all(store.counts(spec.grid_id())["queued"] == 12 for spec in grids)


def test_register_grid_of_2000_trials_is_a_few_statements(store):
    spec = load_grid({**GRID, "seeds": 1000})
    trials = expand_grid(spec)
    statements = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    t0 = time.perf_counter()
    store.register_grid(spec.grid_id(), spec.name, spec.model_dump(mode="json"), trials)
    took = time.perf_counter() - t0
    assert len(trials) == 2000 and store.counts(spec.grid_id())["queued"] == 2000
    assert len(statements) <= 20, f"{len(statements)} statements for 2000 trials"
    assert took < 10, f"register_grid of 2000 trials took {took:.1f} s"


def test_results_table_order_does_not_depend_on_registration_order(store):
    """The bootstrap CI resamples by position: the same results must come back in the same order."""
    spec = load_grid({**GRID, "seeds": 4})
    trials = expand_grid(spec)
    store.register_grid(spec.grid_id(), spec.name, spec.model_dump(mode="json"), list(reversed(trials)))
    for i, t in enumerate(random.Random(0).sample(trials, len(trials))):
        assert store.claim(t.key, "a") and store.finish(t.key, "a", {**RESULT, "test_error": float(i)})
    table = store.results_table(spec.grid_id()).to_pylist()
    order = [(r["variant"], r["seed"]) for r in table]
    assert order == sorted(order) and len(order) == 8
    assert {r["status"] for r in table} == {"finished"}


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


def test_tuned_recipes_are_saved_and_replaced(store):
    record = {"name": "mine", "study": "mine", "trial": 4, "value": 3.5, "recipe": {"lr": 0.03},
              "params": {"lr": 0.03}, "spec": {"dataset": "synthetic"}}
    store.save_tuned(record)
    store.save_tuned({**record, "trial": 7, "value": 2.5, "recipe": {"lr": 0.05}})
    [saved] = store.tuned_records()
    assert (saved["trial"], saved["value"], saved["recipe"]) == (7, 2.5, {"lr": 0.05})
    assert store.tuned_recipes() == {"mine": {"lr": 0.05}}


def test_get_store_takes_a_store_a_url_or_nothing(ablate_home, tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'x.db'}")
    assert get_store(store) is store
    assert get_store(store.url).url == store.url
    assert get_store(None).url == f"sqlite:///{ablate_home / 'state.db'}"
    with pytest.raises(StateError, match="mysql is not supported; use sqlite or postgresql"):
        get_store("mysql://u@localhost/ablate")


# ------------------------------------------------------------------------------------------- migrations
def _open(url: str) -> str:
    StateStore(url)
    return "ok"


def test_processes_opening_a_new_database_at_once_create_it_once(url):
    with mp.get_context("spawn").Pool(4) as pool:
        assert pool.map(_open, [url] * 4) == ["ok"] * 4
    with create_engine(url).connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == [migrate.head()]


def test_models_and_revisions_agree(store):
    """A model changed without a revision (or the reverse) shows up here: see orchestrator/state/migrations."""
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE,
                                                         "include_name": migrate.include_name})
        assert compare_metadata(context, Base.metadata) == []


def _schema(engine, tables) -> dict:
    found = inspect(engine)
    return {t: {"columns": [(c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(t)],
                "primary_key": found.get_pk_constraint(t)["constrained_columns"],
                "foreign_keys": sorted((f["constrained_columns"], f["referred_table"], f["referred_columns"])
                                       for f in found.get_foreign_keys(t)),
                "indexes": sorted((i["name"], i["column_names"], bool(i["unique"])) for i in found.get_indexes(t))}
            for t in tables}


def test_the_baseline_revision_is_the_schema_before_migrations(url, tmp_path, request):
    old = state_v1.create(url, tuned=True)
    new_url = (f"sqlite:///{tmp_path / 'new.db'}" if url.startswith("sqlite") else
               request.getfixturevalue("postgres").create_database(f"t{uuid.uuid4().hex[:12]}"))
    new = open_engine(new_url)
    with new.begin() as conn:  # revision 0002: the baseline plus the tuned recipes tuning used to create
        migrate.upgrade(conn, new_url, target="0002")
    tables = sorted(state_v1.Base.metadata.tables) + ["ablate_tuned_recipes"]
    assert _schema(new, tables) == _schema(old, tables)
    with new.connect() as conn:
        assert conn.execute(text("SELECT value FROM ablate_meta WHERE key = 'schema_version'")).scalar() == "1"


@pytest.mark.parametrize("tuned", [False, True], ids=["without-tuning", "with-tuning"])
def test_a_database_from_before_migrations_upgrades_in_place(url, tuned):
    """Grids, trials, results, attempts (and tuned recipes) written by the old schema stay readable and
    usable; Optuna's tables in the same database (with their own `alembic_version`) are left alone."""
    import optuna
    engine = state_v1.create(url, tuned=tuned)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=url)
    study.tell(study.ask(), 1.5)
    spec = load_grid(GRID)
    trials = expand_grid(spec)
    grid_id, now = spec.grid_id(), time.time()
    states = ["finished", "running", "error", "queued"]
    with Session(engine) as s, s.begin():
        s.add(state_v1.GridRow(id=grid_id, name=spec.name, spec=json.dumps(spec.model_dump(mode="json")),
                               created_at=now, cancelled=False, mlflow_run_id="parent-run"))
        s.flush()
        for t, status in zip(trials, states):
            done = status == "finished"
            s.add(state_v1.TrialRow(key=t.key, config=t.config.model_dump_json(), status=status,
                                    attempts=int(status != "queued"), owner="old" if status == "running" else None,
                                    heartbeat_at=now if status == "running" else None,
                                    result=json.dumps(RESULT) if done else None, test_error=12.5 if done else None,
                                    train_loss=0.3 if done else None, train_error=4.0 if done else None,
                                    error="boom" if status == "error" else None, updated_at=now))
            s.flush()
            s.add(state_v1.GridTrialRow(grid_id=grid_id, trial_key=t.key, dataset=t.dataset, depth=t.depth,
                                        variant=t.variant, seed=t.seed, mlflow_run_id=f"run-{t.seed}",
                                        mlflow_synced=done))
            if status != "queued":
                s.add(state_v1.AttemptRow(trial_key=t.key, owner="old", started_at=now,
                                          ended_at=None if status == "running" else now,
                                          outcome=None if status == "running" else status))
        if tuned:
            s.add(state_v1.TunedRecipeRow(name="lr", study="lr", trial=3, value=2.5, recipe='{"lr": 0.05}',
                                          params='{"lr": 0.05}', spec="{}", updated_at=now))

    store = StateStore(url)
    with store.engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == [migrate.head()]
    rows = {t["key"]: t for t in store.grid_trials(grid_id)}
    assert [rows[t.key]["status"] for t in trials] == states
    finished = rows[trials[0].key]
    assert (finished["result"], finished["test_error"], finished["mlflow_run_id"]) == (RESULT, 12.5, "run-0")
    assert store.grid(grid_id).mlflow_run_id == "parent-run" and store.find_grid("g").id == grid_id
    table = store.results_table(grid_id)
    assert table.column("test_error").to_pylist().count(12.5) == 1
    # Revision 0003 fills the new columns from the stored records.
    assert table.column("test_size").to_pylist().count(10000) == table.column("precision").to_pylist().count("fp32") == 1
    # Revision 0005 fills the top-5 error from them too.
    assert table.column("test_error_top5").to_pylist().count(3.5) == 1
    assert [a.outcome for a in store.attempts(trials[2].key)] == ["error"]
    assert store.tuned_recipes() == ({"lr": {"lr": 0.05}} if tuned else {})
    # The old rows follow the contract: the queued trial can be claimed, the finished one cannot.
    assert store.claim(trials[3].key, "new") and not store.claim(trials[0].key, "new", stale_after=0)
    assert optuna.load_study(study_name="s", storage=url).best_value == 1.5
    StateStore(url)  # opening again: already at head


def test_a_newer_database_is_refused(store):
    with store.transaction() as s:
        s.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(StateError, match="schema revision 9999, newer than this Ablate's"):
        StateStore(store.url)


def test_a_database_from_before_migrations_with_a_newer_schema_version_is_refused(url):
    engine = state_v1.create(url)
    with Session(engine) as s, s.begin():
        s.execute(text("UPDATE ablate_meta SET value = '2' WHERE key = 'schema_version'"))
    with pytest.raises(StateError, match="has schema 2, newer than this Ablate"):
        StateStore(url)
    assert not inspect(engine).has_table(VERSION_TABLE)  # refused, untouched

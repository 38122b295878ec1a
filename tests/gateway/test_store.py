"""The run store against a real redis-server: the run state machine, write-once results with their
counters, events and paged listing."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import redis

from gateway.store import TRANSITIONS, RunStore
from svp.contract import TERMINAL_STATES, Box, GroundedCandidate, ImageResult, RunCreate


@pytest.fixture()
def store(redis_url: str) -> Iterator[RunStore]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield RunStore(client)
    client.flushdb()


def make_run(store: RunStore, run_id: str = "r1", images: int = 3, **config: object) -> None:
    store.create_run(run_id, RunCreate(images="scenes", k=3, top_ratio=0.5, **config), [f"i{i}.png" for i in range(images)])


def result(index: int, scores: list[float], selected: list[int], round_: int = 1) -> ImageResult:
    box = Box(label="red circle", xyxy=(0.1, 0.1, 0.5, 0.5), score=0.9)
    return ImageResult(
        image=f"i{index}.png", index=index, round=round_, adapter=None, prior=["a", "b", "c"],
        candidates=[GroundedCandidate(index=j, text=f"t{j}", finish_reason="stop", boxes=[box], score=s)
                    for j, s in enumerate(scores)],
        selected=selected, dropped={2: "empty"},
    )


def test_state_machine_allows_only_the_listed_transitions(store: RunStore) -> None:
    states = ["queued", "running", "training", "succeeded", "failed", "cancelled"]
    for source in states:
        for target in TRANSITIONS:
            run_id = f"{source}-{target}"
            make_run(store, run_id)
            store.r.hset(f"svp:run:{run_id}", "state", source)
            moved = store.transition(run_id, target)
            assert moved == (source in TRANSITIONS[target]), (source, target)
            assert store.state(run_id) == (target if moved else source)
    # Nothing leaves a terminal state.
    assert all(t not in TRANSITIONS[target] for t in TERMINAL_STATES for target in TRANSITIONS)
    assert store.transition("no-such-run", "running") is False


def test_a_result_written_twice_is_stored_and_counted_once(store: RunStore) -> None:
    make_run(store)
    assert store.start_round("r1", 1, 3) and not store.start_round("r1", 1, 3)
    first = result(0, [1.0, 3.0, 2.0], [1])
    assert store.record_result("r1", first) is True
    assert store.record_result("r1", result(0, [9.0, 9.0, 9.0], [0])) is False  # a duplicate task
    assert store.record_result("r1", result(1, [-1.0, 0.5, 4.0], [2])) is True
    run = store.get_run("r1")
    r = run.rounds[0]
    assert (run.round, r.images_done, r.images_total) == (1, 2, 3)
    assert (r.stages.prior_samples, r.stages.grounded_samples, r.stages.scored, r.stages.selected) == (6, 6, 6, 2)
    assert r.stages.dropped_degenerate == 2
    assert math.isclose(r.scores.mean, (1 + 3 + 2 - 1 + 0.5 + 4) / 6)
    assert (r.scores.min, r.scores.max) == (-1.0, 4.0)
    assert math.isclose(r.scores.selected_mean, (3.0 + 4.0) / 2)
    assert [x.candidates[0].score for x in store.results("r1", 1)] == [1.0, -1.0]
    # a failed image counts as done and as failed, once
    broken = ImageResult(image="images/2.png", index=2, round=1, adapter=None, status="failed", error="bad image")
    assert store.record_result("r1", broken) and not store.record_result("r1", broken)
    r = store.get_run("r1").rounds[0]
    assert (r.images_done, r.images_failed, store.images_failed("r1", 1)) == (3, 1, 1)


def test_events_and_paged_listing_newest_first(store: RunStore) -> None:
    for i in range(5):
        make_run(store, f"run{i}")
    page, count = store.list_runs(skip=1, limit=2)
    assert count == 5 and [r.id for r in page] == ["run3", "run2"]
    store.add_event("run0", "note", "hello")
    assert [e.kind for e in store.events("run0")] == ["created", "note"]
    assert [e.message for e in store.events("run0", since=1)] == ["hello"]


def test_event_indices_stay_stable_when_old_events_are_trimmed(store: RunStore, monkeypatch) -> None:
    import gateway.store

    monkeypatch.setattr(gateway.store, "MAX_EVENTS", 3)  # a short log, so trimming happens
    make_run(store, "r9")  # event 0: created
    for i in range(1, 6):
        store.add_event("r9", "note", f"n{i}")
    kept = store.events("r9")
    assert [(e.index, e.message) for e in kept] == [(3, "n3"), (4, "n4"), (5, "n5")]
    assert [e.index for e in store.events("r9", since=4)] == [4, 5]
    assert [e.index for e in store.events("r9", since=1)] == [3, 4, 5]  # trimmed ones are gone, not renumbered
    assert store.events("r9", since=6) == []

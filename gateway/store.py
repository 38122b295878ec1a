"""Run records, per-image results and events in Redis (production runs Redis with AOF on).

Keys (all under ``svp:``):

* ``runs`` — sorted set of run ids by creation time (paged listing);
* ``run:<id>`` — hash: ``config`` (RunCreate JSON), ``state``, ``round``, timestamps;
* ``run:<id>:images`` — list of image paths relative to the data root (index = image id);
* ``run:<id>:errors`` / ``run:<id>:events`` — lists;
* ``run:<id>:round:<r>`` — hash: round bookkeeping (training job, adapter, times) and the
  stage counters and score sums aggregated over the round's images;
* ``run:<id>:round:<r>:results`` — hash: image index -> :class:`ImageResult` JSON.

A result is written with ``HSETNX`` and the counters are bumped in the same Lua script only when
that write wins, so a task that runs twice for the same (run, round, image) is counted once.
State changes are compare-and-set (Lua) against the transitions in :data:`TRANSITIONS`, so a
cancelled run can never be moved back to running by a late task.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis

from svp.contract import (
    ImageResult,
    RoundPublic,
    RunCreate,
    RunEvent,
    RunPublic,
    RunState,
    ScoreSummary,
    StageCounts,
)

PREFIX = "svp:"
# target state -> states it may be entered from
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    "running": frozenset({"queued", "training"}),
    "training": frozenset({"running"}),
    "succeeded": frozenset({"training"}),
    "failed": frozenset({"queued", "running", "training"}),
    "cancelled": frozenset({"queued", "running", "training"}),
}
MAX_EVENTS = 10_000


def counter_increments(result: ImageResult, grounded: bool) -> dict[str, Any]:
    """The round counters this result adds (applied once, with the result's first write).

    ``grounded`` is False for the self-captioning ablation, whose candidates are the prior samples.
    """
    scored = [c.score for c in result.candidates if c.score is not None]
    selected_scores = [s for s in (result.candidates[i].score for i in result.selected) if s is not None]
    incr = {
        "images_done": 1,
        "images_failed": int(result.status == "failed"),
        "prior_samples": len(result.prior),
        "groundings": len(result.candidates) if grounded else 0,
        "grounded_samples": len(result.candidates) if grounded else 0,
        "scored": len(scored),
        "selected": len(result.selected),
        "dropped_degenerate": sum(reason != "unverified" for reason in result.dropped.values()),
        "dropped_unverified": sum(reason == "unverified" for reason in result.dropped.values()),
        "selected_scored": len(selected_scores),
    }
    return {
        "incr": incr,
        "incrfloat": {"score_sum": float(sum(scored)), "selected_sum": float(sum(selected_scores))},
        "min": {"score_min": min(scored)} if scored else {},
        "max": {"score_max": max(scored)} if scored else {},
    }


# HSETNX the result; only if it won, apply the counter increments (cjson-encoded ARGV[3]).
_RECORD_RESULT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local c = cjson.decode(ARGV[3])
for k, v in pairs(c['incr']) do redis.call('HINCRBY', KEYS[2], k, v) end
for k, v in pairs(c['incrfloat']) do redis.call('HINCRBYFLOAT', KEYS[2], k, v) end
for k, v in pairs(c['min']) do
  local cur = redis.call('HGET', KEYS[2], k)
  if (not cur) or v < tonumber(cur) then redis.call('HSET', KEYS[2], k, v) end
end
for k, v in pairs(c['max']) do
  local cur = redis.call('HGET', KEYS[2], k)
  if (not cur) or v > tonumber(cur) then redis.call('HSET', KEYS[2], k, v) end
end
return 1
"""

# Set state ARGV[1] (at time ARGV[2]) if the current state is one of ARGV[3..]; returns the old state.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return false end
for i = 3, #ARGV do
  if ARGV[i] == cur then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[2])
    return cur
  end
end
return false
"""


def _now() -> datetime:
    return datetime.now(UTC)


class RunNotFound(KeyError):
    pass


class RunStore:
    """Typed access to the run keys; every method is one round trip or one atomic script."""

    def __init__(self, client: redis.Redis):
        self.r: Any = client  # decode_responses=True: every reply is str (redis-py types it bytes | str)
        self._record = client.register_script(_RECORD_RESULT)
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str) -> RunStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=30, health_check_interval=30))

    # ------------------------------------------------------------ keys

    @staticmethod
    def _run(run_id: str) -> str:
        return f"{PREFIX}run:{run_id}"

    @staticmethod
    def _round(run_id: str, round_: int) -> str:
        return f"{PREFIX}run:{run_id}:round:{round_}"

    # ------------------------------------------------------------ runs

    def create_run(self, run_id: str, config: RunCreate, images: list[str]) -> RunPublic:
        now = _now()
        key = self._run(run_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping={
            "config": config.model_dump_json(), "state": "queued", "round": 0,
            "created_at": now.isoformat(), "updated_at": now.isoformat(),
        })
        pipe.rpush(f"{key}:images", *images)
        pipe.zadd(f"{PREFIX}runs", {run_id: now.timestamp()})
        pipe.execute()
        self.add_event(run_id, "created", f"run created over {len(images)} images")
        return self.get_run(run_id)

    def exists(self, run_id: str) -> bool:
        return bool(self.r.exists(self._run(run_id)))

    def config(self, run_id: str) -> RunCreate:
        raw = self.r.hget(self._run(run_id), "config")
        if raw is None:
            raise RunNotFound(run_id)
        return RunCreate.model_validate_json(raw)

    def state(self, run_id: str) -> RunState:
        state = self.r.hget(self._run(run_id), "state")
        if state is None:
            raise RunNotFound(run_id)
        return state  # type: ignore[return-value]

    def current_round(self, run_id: str) -> int:
        return int(self.r.hget(self._run(run_id), "round") or 0)

    def transition(self, run_id: str, to: RunState, message: str | None = None) -> bool:
        """Move the run to ``to`` if allowed from its current state; False (and no change) otherwise."""
        old = self._transition(keys=[self._run(run_id)], args=[to, _now().isoformat(), *TRANSITIONS[to]])
        if old and message:
            self.add_event(run_id, to, message)
        return bool(old)

    def images(self, run_id: str) -> list[str]:
        return list(self.r.lrange(f"{self._run(run_id)}:images", 0, -1))

    def image(self, run_id: str, index: int) -> str:
        path = self.r.lindex(f"{self._run(run_id)}:images", index)
        if path is None:
            raise RunNotFound(f"{run_id} image {index}")
        return path

    def image_count(self, run_id: str) -> int:
        return int(self.r.llen(f"{self._run(run_id)}:images"))

    def add_error(self, run_id: str, message: str) -> None:
        self.r.rpush(f"{self._run(run_id)}:errors", message)
        self.add_event(run_id, "error", message)

    def add_event(self, run_id: str, kind: str, message: str) -> None:
        """Append an event; the log keeps the last MAX_EVENTS, and ``events_total`` counts them all
        (in the same transaction), so an event's index never changes when older ones are trimmed."""
        event = RunEvent(run_id=run_id, at=_now(), kind=kind, message=message)
        key = f"{self._run(run_id)}:events"
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(key, event.model_dump_json(exclude={"index"}))
        pipe.ltrim(key, -MAX_EVENTS, -1)
        pipe.hincrby(self._run(run_id), "events_total", 1)
        pipe.execute()

    def events(self, run_id: str, since: int = 0) -> list[RunEvent]:
        """The events with index >= ``since`` still in the log, each with its index."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hget(self._run(run_id), "events_total")
        pipe.lrange(f"{self._run(run_id)}:events", 0, -1)
        total, raw = pipe.execute()
        first = int(total or 0) - len(raw)  # index of the oldest event still kept
        return [RunEvent.model_validate_json(e).model_copy(update={"index": first + i})
                for i, e in enumerate(raw) if first + i >= since]

    # ------------------------------------------------------------ rounds

    def start_round(self, run_id: str, round_: int, images_total: int) -> bool:
        """Open round ``round_`` once; False when it was already open (a task delivered twice)."""
        key = self._round(run_id, round_)
        if not self.r.hsetnx(key, "started_at", _now().isoformat()):
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, "images_total", images_total)
        pipe.hset(self._run(run_id), mapping={"round": round_, "updated_at": _now().isoformat()})
        pipe.execute()
        return True

    def round_field(self, run_id: str, round_: int, field: str) -> str | None:
        return self.r.hget(self._round(run_id, round_), field)

    def set_round_fields(self, run_id: str, round_: int, **fields: str) -> None:
        self.r.hset(self._round(run_id, round_), mapping=fields)

    def claim_round_field(self, run_id: str, round_: int, field: str, value: str) -> str:
        """Set ``field`` only if unset; returns the value that holds afterwards (ours or the earlier one)."""
        key = self._round(run_id, round_)
        if self.r.hsetnx(key, field, value):
            return value
        current = self.r.hget(key, field)
        assert current is not None
        return current

    def record_result(self, run_id: str, result: ImageResult) -> bool:
        """Store an image's result once; True if this call wrote it (counters bumped), False if it existed."""
        grounded = self.config(run_id).grounding
        written = self._record(
            keys=[f"{self._round(run_id, result.round)}:results", self._round(run_id, result.round)],
            args=[str(result.index), result.model_dump_json(), json.dumps(counter_increments(result, grounded))],
        )
        return bool(written)

    def has_result(self, run_id: str, round_: int, index: int) -> bool:
        return bool(self.r.hexists(f"{self._round(run_id, round_)}:results", str(index)))

    def results(self, run_id: str, round_: int) -> list[ImageResult]:
        raw = self.r.hgetall(f"{self._round(run_id, round_)}:results")
        results = [ImageResult.model_validate_json(v) for v in raw.values()]
        return sorted(results, key=lambda r: r.index)

    def images_done(self, run_id: str, round_: int) -> int:
        return int(self.r.hlen(f"{self._round(run_id, round_)}:results"))

    def images_failed(self, run_id: str, round_: int) -> int:
        return int(self.r.hget(self._round(run_id, round_), "images_failed") or 0)

    # ------------------------------------------------------------ reading

    def get_run(self, run_id: str) -> RunPublic:
        run = self.r.hgetall(self._run(run_id))
        if not run:
            raise RunNotFound(run_id)
        rounds = int(run.get("round", 0))
        pipe = self.r.pipeline()
        for r in range(1, rounds + 1):
            pipe.hgetall(self._round(run_id, r))
        pipe.lrange(f"{self._run(run_id)}:errors", 0, -1)
        replies = pipe.execute()
        return RunPublic(
            id=run_id,
            state=run["state"],
            config=RunCreate.model_validate_json(run["config"]),
            round=rounds,
            rounds=[_round_public(r + 1, h) for r, h in enumerate(replies[:-1])],
            errors=replies[-1],
            created_at=datetime.fromisoformat(run["created_at"]),
            updated_at=datetime.fromisoformat(run["updated_at"]),
        )

    def list_runs(self, skip: int, limit: int) -> tuple[list[RunPublic], int]:
        """Newest first; ``count`` is the total number of runs."""
        ids = self.r.zrevrange(f"{PREFIX}runs", skip, skip + limit - 1)
        runs = []
        for run_id in ids:
            try:
                runs.append(self.get_run(run_id))
            except RunNotFound:  # listed but deleted by an operator: skip it
                continue
        return runs, int(self.r.zcard(f"{PREFIX}runs"))


def _round_public(round_: int, h: dict[str, str]) -> RoundPublic:
    def num(key: str) -> int:
        return int(h.get(key, 0))

    def opt_float(key: str) -> float | None:
        return float(h[key]) if key in h else None

    scored, selected_scored = num("scored"), num("selected_scored")
    return RoundPublic(
        round=round_,
        images_done=num("images_done"),
        images_failed=num("images_failed"),
        images_total=num("images_total"),
        stages=StageCounts(
            prior_samples=num("prior_samples"), groundings=num("groundings"),
            grounded_samples=num("grounded_samples"), scored=scored, selected=num("selected"),
            dropped_degenerate=num("dropped_degenerate"), dropped_unverified=num("dropped_unverified"),
        ),
        scores=ScoreSummary(
            count=scored,
            mean=float(h["score_sum"]) / scored if scored else None,
            min=opt_float("score_min"), max=opt_float("score_max"),
            selected_mean=float(h["selected_sum"]) / selected_scored if selected_scored else None,
        ),
        adapter=h.get("adapter"),
        training_job=h.get("training_job"),
        started_at=datetime.fromisoformat(h["started_at"]) if "started_at" in h else None,
        finished_at=datetime.fromisoformat(h["finished_at"]) if "finished_at" in h else None,
    )

"""Stateful model check of the lifecycle against an independent model of the spec.

The model reads ``spec/lifecycle.yaml`` itself with ``yaml.safe_load`` (never the
generated tables or the code generator) and drives one ``transitions.Machine`` per seed;
guards are evaluated from the YAML guard data, in float32. A Hypothesis
``RuleBasedStateMachine`` sends the same single, batched and thread-parallel requests
(valid and invalid), epoch steps, metric updates, policy overrides and state_dict
save/restores to a :class:`kasmina.LifecycleManager` and to the model, and checks after
every step that states, parents, epochs, error counts and histories agree, and in every
request that the reason codes agree. The run must take every edge of the spec.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from transitions import Machine

import kasmina

SPEC = yaml.safe_load((Path(__file__).resolve().parent.parent / "spec" / "lifecycle.yaml").read_text())
STATES = [s["name"] for s in SPEC["states"]]
STATE_ID = {s["name"]: s["id"] for s in SPEC["states"]}
STATE_NAME = {s["id"]: s["name"] for s in SPEC["states"]}
SPEC_MIN_EPOCHS = {s["name"]: s["min_epochs"] for s in SPEC["states"]}
FIELDS = [f["name"] for f in SPEC["context_fields"]]
PARAM_DEFAULTS = {p["name"]: float(p["default"]) for p in SPEC["params"]}
EDGES = [(t["from"], t["to"]) for t in SPEC["transitions"]]
EDGE_SPEC = {(t["from"], t["to"]): t for t in SPEC["transitions"]}
CODE = {r["name"]: r["code"] for r in SPEC["reasons"]}
COLUMN = {name: i for i, name in enumerate(SPEC["layout"]["state_columns"])}
HISTORY_LENGTH = SPEC["layout"]["history_length"]
INITIAL = next(s["name"] for s in SPEC["states"] if s["kind"] == "idle")
NUM_SEEDS = 5

# Edges taken across the examples of one _run (checked at its end).
EDGES_TAKEN: set[tuple[str, str]] = set()

_COMPARE = {
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a < b or a > b,
}


def guard_holds(guard: dict[str, Any] | None, metrics: dict[str, float], seed: SeedModel, params: dict[str, float]) -> bool:
    """Evaluate a YAML guard in float32; a missing metric is NaN and fails every comparison."""
    if guard is None:
        return True
    mode = "all" if "all" in guard else "any"
    results = []
    for clause in guard[mode]:
        if "builtin" in clause:
            lhs = np.float32({"epochs_in_state": seed.epochs, "error_count": seed.error_count}[clause["builtin"]])
        else:
            lhs = np.float32(metrics.get(clause["field"], math.nan))
        rhs = np.float32(params[clause["param"]] if "param" in clause else clause["value"])
        results.append(bool(_COMPARE[clause["op"]](lhs, rhs)))
    return all(results) if mode == "all" else any(results)


def passing_metrics(edge: tuple[str, str], params: dict[str, float]) -> dict[str, float]:
    """Metrics meeting the edge's guard: every field clause of `all`, one of `any`."""
    guard = EDGE_SPEC[edge].get("guard")
    if guard is None:
        return {}
    clauses = [c for c in guard.get("all", guard.get("any", [])) if "field" in c]
    if "any" in guard:
        clauses = clauses[:1]
    out = {}
    for c in clauses:
        rhs = params[c["param"]] if "param" in c else c["value"]
        out[c["field"]] = rhs + {"lt": -1.0, "le": 0.0, "gt": 1.0, "ge": 0.0, "eq": 0.0, "ne": 1.0}[c["op"]]
    return out


class SeedModel:
    """One seed of the model: its own transitions.Machine plus epoch/error bookkeeping."""

    def __init__(self, owner: LifecycleModel) -> None:
        self.owner = owner
        self.epochs = 0
        self.error_count = 0
        self.parent = INITIAL
        self.history: list[tuple[str, str]] = []
        self.machine = Machine(
            model=self,
            states=STATES,
            initial=INITIAL,
            transitions=[
                {
                    "trigger": f"go_{src}_{dst}",
                    "source": src,
                    "dest": dst,
                    "conditions": [self._guard],
                    "after": [self._committed],
                }
                for src, dst in EDGES
            ],
            auto_transitions=False,
            send_event=True,
        )

    def _guard(self, event) -> bool:
        edge = (event.transition.source, event.transition.dest)
        return guard_holds(EDGE_SPEC[edge].get("guard"), event.kwargs.get("metrics", {}), self, self.owner.params)

    def _committed(self, event) -> None:
        src, dst = event.transition.source, event.transition.dest
        self.parent, self.epochs = src, 0
        self.history.append((src, dst))
        self.owner.edges_taken.add((src, dst))
        EDGES_TAKEN.add((src, dst))

    def judge_and_apply(self, src: str, dst: str, metrics: dict[str, float]) -> str:
        """The reason name of the request per DESIGN §4 (checks after range and
        duplicates), applying it through the machine when it passes."""
        if self.state != src:
            return "STALE_FROM_STATE"
        if (src, dst) not in EDGE_SPEC:
            return "INVALID_EDGE"
        bypass = EDGE_SPEC[(src, dst)].get("bypass_min_epochs", False)
        if not bypass and self.epochs < self.owner.min_epochs[src]:
            return "MIN_EPOCHS"
        moved = getattr(self, f"go_{src}_{dst}")(metrics=metrics)
        return "OK" if moved else "GUARD_FAILED"

    def snapshot(self) -> tuple:
        return (self.state, self.epochs, self.error_count, self.parent, list(self.history))

    def restore(self, snap: tuple) -> None:
        state, self.epochs, self.error_count, self.parent, history = snap
        self.history = list(history)
        self.machine.set_state(state, model=self)


class LifecycleModel:
    """All seeds plus the current policy, as names and plain numbers."""

    def __init__(self) -> None:
        self.min_epochs = dict(SPEC_MIN_EPOCHS)
        self.params = dict(PARAM_DEFAULTS)
        self.seeds = [SeedModel(self) for _ in range(NUM_SEEDS)]
        # Edges taken in this example: what steers `explore`, so that a replayed example
        # takes the same steps (EDGES_TAKEN outlives an example).
        self.edges_taken: set[tuple[str, str]] = set()

    def judge_batch(self, requests: list[tuple[int, str, str, dict[str, float]]]) -> list[str]:
        counts: dict[int, int] = {}
        for seed, *_ in requests:
            if 0 <= seed < NUM_SEEDS:
                counts[seed] = counts.get(seed, 0) + 1
        out = []
        for seed, src, dst, metrics in requests:
            if not 0 <= seed < NUM_SEEDS:
                out.append("UNKNOWN_SEED")
            elif counts[seed] > 1:
                out.append("DUPLICATE_IN_BATCH")
            else:
                out.append(self.seeds[seed].judge_and_apply(src, dst, metrics))
        return out


# ---- strategies -------------------------------------------------------------------------

seed_ids = st.integers(-1, NUM_SEEDS)
state_names = st.sampled_from(STATES)


def metric_values(params: dict[str, float]) -> st.SearchStrategy[dict[str, float]]:
    near = sorted(
        {float(np.nextafter(np.float32(v), np.float32(d))) for v in params.values() for d in (-1, 1)}
        | {float(np.float32(v)) for v in params.values()}
    )
    value = st.one_of(st.sampled_from(near), st.floats(-1.0, 2.0, width=32), st.just(math.nan))
    return st.dictionaries(st.sampled_from(FIELDS), value, max_size=len(FIELDS))


class LifecycleMachine(RuleBasedStateMachine):
    """Drives a LifecycleManager and the model with the same operations."""

    def __init__(self) -> None:
        super().__init__()
        self.model = LifecycleModel()
        self.state = kasmina.ExtendedStateTensor(NUM_SEEDS)
        self.manager = kasmina.LifecycleManager(self.state, policy=self._policy())
        self.saved: tuple | None = None

    def _policy(self) -> kasmina.LifecyclePolicy:
        return kasmina.LifecyclePolicy.default().with_overrides(min_epochs=self.model.min_epochs, params=self.model.params)

    @initialize(small=st.dictionaries(state_names, st.integers(0, 2)))
    def small_policy(self, small: dict[str, int]) -> None:
        """Short minimums, so deep states are reachable in a few steps."""
        self.model.min_epochs = {name: min(n, 2) for name, n in SPEC_MIN_EPOCHS.items()}
        self.model.min_epochs.update(small)
        self.manager.set_policy(self._policy())

    # ---- requests ---------------------------------------------------------------------

    def _single(self, seed: int, src: str, dst: str, metrics: dict[str, float]) -> None:
        result = self.manager.request_transition(seed, src, dst, metrics)
        expected = self.model.judge_batch([(seed, src, dst, metrics)])[0]
        assert result.code == CODE[expected], (seed, src, dst, metrics, result, expected)
        assert result.success == (expected == "OK") and (result.reason is None) == result.success

    def _next_edge(self, seed: int) -> tuple[int, tuple[str, str]] | None:
        """(distance, first edge) of a shortest path from the seed's state to an edge
        not taken yet in this example, or None when no such edge is reachable."""
        start = self.model.seeds[seed].state
        frontier, seen = [(start, None, 0)], {start}
        while frontier:
            here, first, dist = frontier.pop(0)
            for edge in (e for e in EDGES if e[0] == here):
                if edge not in self.model.edges_taken:
                    return dist, first or edge
                if edge[1] not in seen:
                    seen.add(edge[1])
                    frontier.append((edge[1], first or edge, dist + 1))
        return None

    def _take(self, seed: int, edge: tuple[str, str]) -> None:
        """Step epochs until the minimum allows the edge, then take it (must succeed)."""
        if not EDGE_SPEC[edge].get("bypass_min_epochs", False):
            while self.model.seeds[seed].epochs < self.model.min_epochs[edge[0]]:
                self.step_epoch()
        self._single(seed, edge[0], edge[1], passing_metrics(edge, self.model.params))
        assert self.model.seeds[seed].state == edge[1]

    @rule(moves=st.integers(1, 6))
    def explore(self, moves: int) -> None:
        """Steer the seed nearest to an edge not taken yet in this example towards it,
        several moves (none when every reachable edge is taken). Everything it decides
        comes from this example's own steps, so a replayed example draws the same."""
        for _ in range(moves):
            options = [(found[0], seed, found[1]) for seed in range(NUM_SEEDS) if (found := self._next_edge(seed))]
            if not options:
                return
            _, seed, edge = min(options)
            self._take(seed, edge)

    @rule(data=st.data())
    def advance(self, data) -> None:
        """Move a random seed along a random edge of its state (valid, guard met)."""
        seed = data.draw(st.integers(0, NUM_SEEDS - 1), label="seed")
        out = [e for e in EDGES if e[0] == self.model.seeds[seed].state]
        if out:
            self._take(seed, data.draw(st.sampled_from(out), label="edge"))

    @rule(seed=seed_ids, src=state_names, dst=state_names, data=st.data())
    def random_single(self, seed: int, src: str, dst: str, data) -> None:
        metrics = data.draw(metric_values(self.model.params), label="metrics")
        self._single(seed, src, dst, metrics)

    @rule(seed=st.integers(0, NUM_SEEDS - 1), dst=state_names, data=st.data())
    def plausible_single(self, seed: int, dst: str, data) -> None:
        """From the seed's actual state: exercises edges, minimums and guards."""
        metrics = data.draw(metric_values(self.model.params), label="metrics")
        self._single(seed, self.model.seeds[seed].state, dst, metrics)

    @rule(data=st.data())
    def batch(self, data) -> None:
        k = data.draw(st.integers(0, 2 * NUM_SEEDS), label="k")
        requests = []
        for _ in range(k):
            seed = data.draw(seed_ids, label="seed")
            actual = self.model.seeds[seed].state if 0 <= seed < NUM_SEEDS else INITIAL
            src = data.draw(st.one_of(st.just(actual), state_names), label="from")
            targets = [e[1] for e in EDGES if e[0] == actual] or STATES
            dst = data.draw(st.one_of(st.sampled_from(targets), state_names), label="to")
            metrics = data.draw(
                st.one_of(
                    st.just(passing_metrics((src, dst), self.model.params)) if (src, dst) in EDGE_SPEC else st.just({}),
                    metric_values(self.model.params),
                ),
                label="metrics",
            )
            requests.append((seed, src, dst, metrics))
        context = {name: [m.get(name, math.nan) for *_, m in requests] for name in FIELDS}
        codes = self.manager.request_transitions(
            [r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests], context if k else None
        )
        expected = self.model.judge_batch(requests)
        assert codes.tolist() == [CODE[e] for e in expected], (requests, expected)

    @rule(data=st.data())
    def threaded_singles(self, data) -> None:
        """Distinct seeds from parallel threads, plus two identical racing requests."""
        seeds = data.draw(st.lists(st.integers(0, NUM_SEEDS - 1), min_size=2, max_size=NUM_SEEDS, unique=True), label="seeds")
        requests = []
        for seed in seeds:
            here = self.model.seeds[seed].state
            out = [e for e in EDGES if e[0] == here]
            edge = data.draw(st.sampled_from(out), label="edge") if out else (here, data.draw(state_names, label="to"))
            requests.append((seed, *edge, passing_metrics(edge, self.model.params) if edge in EDGE_SPEC else {}))
        racer = requests[0]
        results: dict[int, Any] = {}
        barrier = threading.Barrier(len(requests) + 1)

        def send(slot: int, request) -> None:
            barrier.wait()
            results[slot] = self.manager.request_transition(*request)

        threads = [threading.Thread(target=send, args=(i, r)) for i, r in enumerate([*requests, racer])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = [self.model.judge_batch([r])[0] for r in requests]
        for i, name in enumerate(expected[1:], start=1):
            assert results[i].code == CODE[name], (requests[i], results[i], name)
        race = sorted([results[0].code, results[len(requests)].code])
        if expected[0] == "OK":
            assert race == [CODE["OK"], CODE["STALE_FROM_STATE"]], race
        else:
            assert race == [CODE[expected[0]]] * 2, race

    # ---- epochs, metrics, policy, persistence ------------------------------------------

    @rule()
    def step_epoch(self) -> None:
        self.manager.step_epoch()
        for seed in self.model.seeds:
            seed.epochs += 1

    @rule(seeds=st.lists(st.integers(0, NUM_SEEDS - 1), max_size=8), loss=st.floats(0, 1, width=32))
    def update_metrics(self, seeds: list[int], loss: float) -> None:
        self.state.increment_error_count(seeds)
        for seed in seeds:
            self.model.seeds[seed].error_count += 1
        unique = sorted(set(seeds))
        self.state.update_performance(unique, loss=loss, stability=1.0 - loss)

    @rule(
        min_epochs=st.dictionaries(state_names, st.integers(0, 3), max_size=3),
        params=st.dictionaries(st.sampled_from(sorted(PARAM_DEFAULTS)), st.floats(-0.25, 1.0, width=32), max_size=2),
    )
    def override_policy(self, min_epochs: dict[str, int], params: dict[str, float]) -> None:
        self.model.min_epochs.update(min_epochs)
        self.model.params.update(params)
        self.manager.set_policy(self._policy())

    @rule()
    def save(self) -> None:
        saved = {k: v.clone() for k, v in self.state.state_dict().items()}
        fresh = kasmina.ExtendedStateTensor(NUM_SEEDS)
        fresh.load_state_dict(saved)
        assert torch.equal(fresh.get_state(), self.state.get_state())
        self.saved = (saved, [s.snapshot() for s in self.model.seeds])

    @precondition(lambda self: self.saved is not None)
    @rule()
    def restore(self) -> None:
        saved, snaps = self.saved
        self.state.load_state_dict(saved)
        for seed, snap in zip(self.model.seeds, snaps, strict=True):
            seed.restore(snap)

    # ---- invariants -----------------------------------------------------------------------

    @invariant()
    def implementation_matches_model(self) -> None:
        rows = self.state.get_state().tolist()
        for i, (row, seed) in enumerate(zip(rows, self.model.seeds, strict=True)):
            got = (
                STATE_NAME[row[COLUMN["LIFECYCLE_STATE"]]],
                row[COLUMN["EPOCHS_IN_STATE"]],
                row[COLUMN["ERROR_COUNT"]],
                STATE_NAME[row[COLUMN["PARENT_STATE"]]],
            )
            assert got == (seed.state, seed.epochs, seed.error_count, seed.parent), (i, got)
            history = [(STATE_NAME[a], STATE_NAME[b]) for a, b in self.state.get_transition_history(i)]
            assert history == seed.history[-HISTORY_LENGTH:], i
            assert int(self.state.history_count[i]) == len(seed.history)


def _run(max_examples: int, steps: int, derandomize: bool) -> None:
    EDGES_TAKEN.clear()
    run_state_machine_as_test(
        LifecycleMachine,
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=steps,
            deadline=None,
            derandomize=derandomize,
            database=None if derandomize else settings.default.database,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        ),
    )
    missing = sorted(set(EDGES) - EDGES_TAKEN)
    assert not missing, f"edges of the spec never taken: {missing}"
    reached = {dst for _, dst in EDGES_TAKEN}
    assert {s["name"] for s in SPEC["states"] if s["kind"] in ("permanent", "retired")} <= reached


def test_stateful_model_check() -> None:
    """CI profile: derandomized, covers every edge in well under 3 minutes. Thread-parallel
    requests interleave differently from run to run (30 examples once missed two edges
    after other tests had changed the thread timing), hence 80."""
    _run(max_examples=80, steps=40, derandomize=True)


@pytest.mark.slow
def test_stateful_model_check_long() -> None:
    """Longer random exploration (`pytest -m slow`)."""
    _run(max_examples=300, steps=80, derandomize=False)

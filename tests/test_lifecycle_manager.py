"""LifecycleManager: single and batched requests, messages, callbacks after the commit,
failing callbacks, the bounded log and concurrent use from several threads."""

from __future__ import annotations

import itertools
import logging
import threading

import pytest
import torch

from kasmina import ExtendedLifecycle as L
from kasmina import ExtendedStateTensor, LifecycleManager, LifecyclePolicy, Reason, TransitionContext, TransitionResult
from kasmina import ops as kops
from kasmina._generated.lifecycle_tables import StateColumn

BACKENDS = ["reference"] + (["kernel"] if kops.HAS_EXTENSION else [])
FAST = LifecyclePolicy.default().with_overrides(min_epochs={s.name: 0 for s in L})


@pytest.fixture(params=BACKENDS)
def manager(request, monkeypatch) -> LifecycleManager:
    if request.param == "reference":
        monkeypatch.setattr(kops, "HAS_EXTENSION", False)
    return LifecycleManager(ExtendedStateTensor(8), policy=FAST)


def test_single_requests(manager: LifecycleManager) -> None:
    result = manager.request_transition(3, L.DORMANT, L.GERMINATED)
    assert isinstance(result, TransitionResult)
    assert result.success and result.code is Reason.OK and result.reason is None and bool(result)
    success, error = manager.request_transition(3, "GERMINATED", "FOSSILIZED")
    assert not success and error == "no transition GERMINATED -> FOSSILIZED in the lifecycle"
    result = manager.request_transition(3, L.DORMANT, L.GERMINATED)
    assert result.code is Reason.STALE_FROM_STATE and result.reason == "seed 3 is in GERMINATED, not DORMANT"
    result = manager.request_transition(99, L.DORMANT, L.GERMINATED)
    assert result.code is Reason.UNKNOWN_SEED and result.reason == "seed 99 does not exist (the layer has 8 seeds)"
    assert manager.state.lifecycle_state(3) == L.GERMINATED
    assert manager.state.get_transition_history(3) == [(L.DORMANT, L.GERMINATED)]


def test_context_feeds_guards_and_state_is_the_source_of_truth(manager: LifecycleManager) -> None:
    manager.request_transition(0, L.DORMANT, L.GERMINATED)
    manager.request_transition(0, L.GERMINATED, L.TRAINING)
    # The context claims many epochs; the device state (0 epochs) decides.
    strict = FAST.with_overrides(min_epochs={"TRAINING": 2})
    manager.set_policy(strict)
    claim = TransitionContext(0, L.TRAINING, L.GRAFTING, epochs_in_state=500, performance_metrics={"reconstruction_loss": 0.0})
    result = manager.request_transition(0, L.TRAINING, L.GRAFTING, claim)
    assert result.code is Reason.MIN_EPOCHS and "spent 0 of the 2 epochs" in result.reason
    manager.step_epoch()
    manager.step_epoch()
    result = manager.request_transition(0, L.TRAINING, L.GRAFTING, {"reconstruction_loss": 0.02})
    assert result.code is Reason.GUARD_FAILED and "reconstruction_loss=0.02 > reconstruction_threshold=0.01" in result.reason
    assert manager.request_transition(0, L.TRAINING, L.GRAFTING, claim).success
    assert manager.policy is strict


def test_bad_single_requests_raise_and_change_nothing(manager: LifecycleManager) -> None:
    before = manager.state.get_state()
    with pytest.raises(ValueError, match="unknown lifecycle state 'LIMBO'"):
        manager.request_transition(0, L.DORMANT, "LIMBO")
    with pytest.raises(TypeError, match="seed_id must be an int"):
        manager.request_transition("0", L.DORMANT, L.GERMINATED)
    with pytest.raises(ValueError, match="context is for seed 1"):
        manager.request_transition(0, L.DORMANT, L.GERMINATED, TransitionContext(1, L.DORMANT, L.GERMINATED))
    with pytest.raises(ValueError, match="context targets TRAINING"):
        manager.request_transition(0, L.DORMANT, L.GERMINATED, TransitionContext(0, L.DORMANT, L.TRAINING))
    with pytest.raises(TypeError, match="context must be"):
        manager.request_transition(0, L.DORMANT, L.GERMINATED, [0.1])
    with pytest.raises(TypeError, match="metric 'reconstruction_loss' must be a number, got 'abc'"):
        manager.request_transition(0, L.DORMANT, L.GERMINATED, {"reconstruction_loss": "abc"})
    assert torch.equal(manager.state.get_state(), before)


def test_callbacks_run_after_commit_and_failures_are_reported(manager: LifecycleManager, caplog) -> None:
    seen = []

    def record(seed_id, src, dst, context) -> None:
        seen.append((seed_id, src, dst, manager.state.lifecycle_state(seed_id), context.performance_metrics))

    def explode(seed_id, src, dst, context) -> None:
        raise RuntimeError("boom")

    manager.register_transition_callback(L.DORMANT, L.GERMINATED, explode)
    manager.register_transition_callback("DORMANT", "GERMINATED", record)
    with caplog.at_level(logging.ERROR, logger="kasmina.lifecycle"):
        result = manager.request_transition(2, L.DORMANT, L.GERMINATED, {"performance_delta": 0.5})
    assert result.success and len(result.callback_errors) == 1 and "RuntimeError: boom" in result.callback_errors[0]
    assert "transition callback" in caplog.text
    # The failing callback neither undid the transition nor stopped the next callback.
    assert seen == [(2, L.DORMANT, L.GERMINATED, L.GERMINATED, {"performance_delta": 0.5})]
    assert manager.state.lifecycle_state(2) == L.GERMINATED
    # Failed requests call nothing; batched successes call back per seed.
    manager.request_transition(2, L.DORMANT, L.GERMINATED)
    codes = manager.request_transitions([4, 5, 2], [L.DORMANT] * 3, [L.GERMINATED] * 3)
    assert codes.tolist() == [Reason.OK, Reason.OK, Reason.STALE_FROM_STATE]
    assert [s[0] for s in seen] == [2, 4, 5]
    errors = manager.get_transition_history(limit=1)[0].callback_errors
    assert [e.split(":")[0] for e in errors] == ["seed 4", "seed 5"]
    assert all(e.endswith("explode: RuntimeError: boom") for e in errors)


def test_callback_registration_is_checked(manager: LifecycleManager) -> None:
    with pytest.raises(ValueError, match="no transition DORMANT -> FOSSILIZED"):
        manager.register_transition_callback(L.DORMANT, L.FOSSILIZED, lambda *a: None)
    with pytest.raises(TypeError, match="callable"):
        manager.register_transition_callback(L.DORMANT, L.GERMINATED, 3)


def test_log_is_bounded_and_filterable() -> None:
    manager = LifecycleManager(ExtendedStateTensor(4), history_limit=5)
    manager.request_transitions([0, 1, 9], [L.DORMANT] * 3, [L.GERMINATED] * 3)
    summary = manager.get_transition_history()[-1]
    assert summary.seed_id is None and summary.batch_size == 3
    assert summary.reason_counts == {"OK": 2, "UNKNOWN_SEED": 1}
    for _ in range(6):
        manager.request_transition(2, L.DORMANT, L.GERMINATED, {"stability_score": 0.5})
    records = manager.get_transition_history()
    assert len(records) == 5 and all(r.seed_id == 2 for r in records)
    first = records[0]
    assert first.from_state == "DORMANT" and first.to_state == "GERMINATED" and first.context == {"stability_score": 0.5}
    assert [r.success for r in records] == [False] * 5  # the first (successful) one fell off the log
    assert [r.code for r in records] == ["STALE_FROM_STATE"] * 5
    assert len(manager.get_transition_history(seed_id=2, limit=2)) == 2
    assert manager.get_transition_history(seed_id=0) == []
    assert records[-1].time >= records[0].time


def test_threads_share_one_manager(manager: LifecycleManager) -> None:
    """Many threads race on the same seeds: exactly one request per move wins, every
    history stays consistent with the state."""
    state = manager.state
    cycle = [(L.DORMANT, L.GERMINATED), (L.GERMINATED, L.CANCELLED), (L.CANCELLED, L.DORMANT)]
    wins = [0] * state.num_seeds
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def worker(offset: int) -> None:
        barrier.wait()
        for i in range(60):
            seed = (i + offset) % state.num_seeds
            current = state.lifecycle_state(seed)
            src, dst = next(edge for edge in cycle if edge[0] == current)
            if manager.request_transition(seed, src, dst).success:
                with lock:
                    wins[seed] += 1
            if i % 7 == 0:
                manager.request_transitions([seed], [src], [dst])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in range(state.num_seeds):
        count = int(state.history_count[seed])
        assert count >= wins[seed]
        history = state.get_transition_history(seed)
        assert history[-1][1] == state.lifecycle_state(seed) if history else True
        for (_, b), (c, _) in itertools.pairwise(history):
            assert b == c  # each transition starts where the previous ended
        assert state.get_state(seed)[StateColumn.PARENT_STATE] == (history[-1][0] if history else L.DORMANT)


def test_rejects_non_state() -> None:
    with pytest.raises(TypeError, match="ExtendedStateTensor"):
        LifecycleManager(torch.zeros(3, 8))

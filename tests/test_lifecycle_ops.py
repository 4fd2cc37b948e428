"""The lifecycle ops: the compiled kernels agree with the pure-torch reference on random
batches (valid, invalid, guarded, duplicate and out-of-range requests, corner values),
the fake kernels match, and the kernels refuse malformed tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasmina import _reference
from kasmina import ops as kops
from kasmina._generated import lifecycle_tables as T
from kasmina._generated.lifecycle_tables import StateColumn
from kasmina.policy import LifecyclePolicy

needs_kernel = pytest.mark.skipif(not kops.HAS_EXTENSION, reason="the compiled extension is not built")
INT32_MAX = 2**31 - 1
S, F, H = T.NUM_STATES, len(T.CONTEXT_FIELDS), T.HISTORY_LENGTH


def _interesting_floats(params: list[float]) -> st.SearchStrategy[float]:
    near = [float(np.nextafter(np.float32(p), np.float32(d))) for p in params for d in (-np.inf, np.inf)]
    return st.one_of(
        st.sampled_from([*params, *near, math.nan, math.inf, -math.inf, 0.0]),
        st.floats(-1.0, 1.0, width=32),
    )


@st.composite
def batches(draw):
    n = draw(st.integers(1, 24))
    policy = LifecyclePolicy.default().with_overrides(
        min_epochs={name: draw(st.integers(0, 4)) for name in T.STATE_NAMES},
        params={name: draw(st.floats(-1.0, 6.0, width=32)) for name in T.PARAM_NAMES},
    )
    state = torch.zeros(n, len(T.STATE_COLUMNS), dtype=torch.int32)
    state[:, StateColumn.LIFECYCLE_STATE] = torch.tensor(draw(st.lists(st.integers(0, S - 1), min_size=n, max_size=n)))
    state[:, StateColumn.PARENT_STATE] = torch.tensor(draw(st.lists(st.integers(0, S - 1), min_size=n, max_size=n)))
    epochs = st.one_of(st.integers(0, 6), st.sampled_from([INT32_MAX - 1, INT32_MAX]))
    state[:, StateColumn.EPOCHS_IN_STATE] = torch.tensor(draw(st.lists(epochs, min_size=n, max_size=n)))
    state[:, StateColumn.ERROR_COUNT] = torch.tensor(draw(st.lists(st.integers(0, 8), min_size=n, max_size=n)))
    counts = st.one_of(st.integers(0, 3 * H), st.sampled_from([INT32_MAX - 1, INT32_MAX]))
    history_count = torch.tensor(draw(st.lists(counts, min_size=n, max_size=n)), dtype=torch.int32)
    history = torch.randint(0, S, (n, H, 2), dtype=torch.int32, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))

    k = draw(st.integers(0, 3 * n))
    seed_ids = draw(st.lists(st.integers(-2, n + 1), min_size=k, max_size=k))
    current = state[:, StateColumn.LIFECYCLE_STATE].tolist()
    from_states, to_states = [], []
    for seed in seed_ids:
        actual = current[seed] if 0 <= seed < n else 0
        from_states.append(draw(st.one_of(st.just(actual), st.integers(-1, S))))
        targets = [dst for dst in range(S) if T.EDGE_MATRIX[actual][dst] >= 0]
        to_states.append(draw(st.one_of(st.sampled_from(targets or [0]), st.integers(-1, S))))
    values = _interesting_floats(list(policy.params))
    context = torch.tensor(
        draw(st.lists(st.lists(values, min_size=F, max_size=F), min_size=k, max_size=k)), dtype=torch.float32
    ).reshape(k, F)
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    requests = (
        torch.tensor(seed_ids, dtype=torch.int64),
        torch.tensor(from_states, dtype=index_dtype),
        torch.tensor(to_states, dtype=index_dtype),
        context,
        *policy.tensors("cpu"),
    )
    return (state, history, history_count), requests


def _run(impl, buffers, requests):
    mine = tuple(b.clone() for b in buffers)
    codes = impl(*mine, *requests)
    return codes, mine


@needs_kernel
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches())
def test_kernel_matches_reference(batch) -> None:
    buffers, requests = batch
    codes_k, out_k = _run(torch.ops.kasmina.apply_transitions, buffers, requests)
    codes_r, out_r = _run(_reference.apply_transitions, buffers, requests)
    assert codes_k.dtype == codes_r.dtype == torch.int32
    assert codes_k.tolist() == codes_r.tolist()
    for a, b in zip(out_k, out_r, strict=True):
        assert torch.equal(a, b)
    # Failed requests changed nothing in their seeds' rows.
    ids = requests[0]
    failed = ids[(codes_k != 0) & (ids >= 0) & (ids < buffers[0].shape[0])]
    touched = ids[codes_k == 0]
    untouched = failed[~torch.isin(failed, touched)]
    for before, after in zip(buffers, out_k, strict=True):
        assert torch.equal(before[untouched], after[untouched])


@needs_kernel
def test_large_batch_matches_reference() -> None:
    """Many requests: the parallel (more than one task of 2**15 requests) and
    duplicate-marking paths of the kernel."""
    gen = torch.Generator().manual_seed(7)
    n, k = 50_000, 80_000
    state = torch.zeros(n, len(T.STATE_COLUMNS), dtype=torch.int32)
    state[:, StateColumn.LIFECYCLE_STATE] = torch.randint(0, S, (n,), generator=gen, dtype=torch.int32)
    state[:, StateColumn.EPOCHS_IN_STATE] = torch.randint(0, 200, (n,), generator=gen, dtype=torch.int32)
    buffers = (state, torch.zeros(n, H, 2, dtype=torch.int32), torch.randint(0, 50, (n,), generator=gen, dtype=torch.int32))
    ids = torch.randint(-5, n + 5, (k,), generator=gen)
    edges = torch.tensor(T.EDGES)[torch.randint(0, T.NUM_EDGES, (k,), generator=gen)]
    context = torch.rand(k, F, generator=gen) * 0.2 - 0.05
    context[torch.rand(k, F, generator=gen) < 0.1] = math.nan
    to_states = edges[:, 1].clone()
    scramble = torch.rand(k, generator=gen) < 0.1
    to_states[scramble] = torch.randint(-1, S + 1, (int(scramble.sum()),), generator=gen)
    requests = (ids, edges[:, 0].contiguous(), to_states, context, *LifecyclePolicy.default().tensors())
    codes_k, out_k = _run(torch.ops.kasmina.apply_transitions, buffers, requests)
    codes_r, out_r = _run(_reference.apply_transitions, buffers, requests)
    assert torch.equal(codes_k, codes_r)
    assert all(torch.equal(a, b) for a, b in zip(out_k, out_r, strict=True))
    assert {int(c) for c in codes_k.unique()} == set(range(len(T.REASON_NAMES)))


@needs_kernel
@pytest.mark.parametrize("n", [1, 5, 70_001])
def test_step_epoch_and_summary_match_reference(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    state = torch.zeros(n, len(T.STATE_COLUMNS), dtype=torch.int32)
    state[:, StateColumn.LIFECYCLE_STATE] = torch.randint(-1, S + 1, (n,), generator=gen, dtype=torch.int32)
    state[:, StateColumn.EPOCHS_IN_STATE] = torch.randint(INT32_MAX - 2, INT32_MAX, (n,), generator=gen, dtype=torch.int32)
    mine, ref = state.clone(), state.clone()
    for _ in range(3):
        torch.ops.kasmina.step_epoch(mine)
        _reference.step_epoch(ref)
    assert torch.equal(mine, ref)
    assert (mine[:, StateColumn.EPOCHS_IN_STATE] == INT32_MAX).all()
    summary = torch.ops.kasmina.state_summary(state)
    assert summary.dtype == torch.int64 and summary.shape == (S,)
    assert torch.equal(summary, _reference.state_summary(state))
    valid = state[:, StateColumn.LIFECYCLE_STATE]
    assert int(summary.sum()) == int(((valid >= 0) & (valid < S)).sum())


def _sample_args(n: int = 6, k: int = 4):
    state = torch.zeros(n, len(T.STATE_COLUMNS), dtype=torch.int32)
    return [
        state,
        torch.zeros(n, H, 2, dtype=torch.int32),
        torch.zeros(n, dtype=torch.int32),
        torch.tensor([0, 1, 1, 9])[:k],
        torch.zeros(k, dtype=torch.int64),
        torch.ones(k, dtype=torch.int64),
        torch.full((k, F), math.nan),
        *LifecyclePolicy.default().tensors(),
    ]


@needs_kernel
def test_opcheck_fake_kernels_and_schemas() -> None:
    torch.library.opcheck(torch.ops.kasmina.apply_transitions.default, _sample_args())
    torch.library.opcheck(torch.ops.kasmina.step_epoch.default, (_sample_args()[0],))
    torch.library.opcheck(torch.ops.kasmina.state_summary.default, (_sample_args()[0],))


@needs_kernel
@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (0, torch.zeros(6, 7, dtype=torch.int32), "state must have shape"),
        (0, torch.zeros(6, len(T.STATE_COLUMNS), dtype=torch.int64), "state must be int32"),
        (1, torch.zeros(5, H, 2, dtype=torch.int32), "history must have shape"),
        (2, torch.zeros(6, dtype=torch.int64), "history_count must be int32"),
        (3, torch.zeros(4, dtype=torch.int32), "seed_ids must be int64"),
        (4, torch.zeros(3, dtype=torch.int64), "from_states must have shape"),
        (5, torch.ones(4, dtype=torch.int32), "both be int32 or both int64"),
        (6, torch.zeros(4, F - 1), "context must have shape"),
        (7, torch.zeros(S - 1, dtype=torch.int32), "min_epochs must have shape"),
        (8, torch.zeros(len(T.PARAM_NAMES), dtype=torch.float64), "params must be float32"),
    ],
)
def test_kernel_refuses_malformed_tensors(index: int, value: torch.Tensor, match: str) -> None:
    args = _sample_args()
    args[index] = value
    before = [a.clone() for a in args[:3]]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kasmina.apply_transitions(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[:3], before, strict=True))


def test_dispatch_follows_the_backend(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(kops, "HAS_EXTENSION", False)
    monkeypatch.setattr(_reference, "step_epoch", lambda state: calls.append("reference"))
    kops.step_epoch(torch.zeros(2, len(T.STATE_COLUMNS), dtype=torch.int32))
    assert calls == ["reference"]

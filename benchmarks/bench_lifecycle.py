"""`python -m benchmarks.bench_lifecycle [--device cpu|cuda] [--quick]`: the batched
lifecycle ops and the single-request Python API.

For 10K, 100K and 1M seeds (10K and 100K with ``--quick``):

- ``apply``: one ``apply_transitions`` batch with a request for every seed in random
  order — valid moves (guards met), guard failures, minimum-epoch refusals, invalid
  edges, stale from-states, unknown seeds and duplicates — through
  ``ExtendedStateTensor.apply_transitions``;
- ``step_epoch``: one lifecycle epoch for every seed.

Columns: ``seeds/s``; ``bound`` = time a ``clone`` of the bytes the op must touch takes
(measured in the same run) / kasmina time (1.0 = at the memory-copy rate), ``bound_copy``
the same against a copy into an existing buffer (a clone also pays for a fresh allocation
and its page faults); ``x_ref`` =
speed-up over the pure-torch reference; ``x_transitions`` = per-seed throughput over the
``transitions`` library driving one Machine per seed (measured at a size it can handle).
Then the p50 latency of one ``LifecycleManager.request_transition`` (accepted and refused)
and of one seed's state query.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections.abc import Callable, Iterator

import torch

from benchmarks._harness import Report, Stats, copy_rate, measure, parse_args
from kasmina import ExtendedLifecycle, ExtendedStateTensor, LifecycleManager, LifecyclePolicy, _reference
from kasmina._generated import lifecycle_tables as T
from kasmina._generated.lifecycle_tables import StateColumn

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
TRANSITIONS_SEEDS = 2_000
# Bytes one request touches: seed id 8, from 4, to 4, context 4*F, code 4, the seed's
# state row, its history count and one history slot (8).
REQUEST_BYTES = 8 + 4 + 4 + 4 * len(T.CONTEXT_FIELDS) + 4 + 4 * len(T.STATE_COLUMNS) + 4 + 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_with_setup(setup: Callable[[], None], fn: Callable[[], object], device: torch.device,
                       repeats: int, warmup: int = 2) -> Stats:
    """Like harness.measure, but runs the untimed ``setup`` (restoring the state the
    batch mutates) before every call."""
    for _ in range(warmup):
        setup()
        fn()
    samples = []
    with _gc_paused():
        for _ in range(repeats):
            setup()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples.append(time.perf_counter() - start)
    return Stats(tuple(samples))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No garbage collection inside timed loops (as harness.measure)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def copy_into(nbytes: int, device: torch.device, repeats: int) -> Stats:
    """Time of a copy of ``nbytes`` into an existing buffer (no allocation, no page faults):
    the steady-state memory-copy reference, next to the harness's ``clone``."""
    src = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), device=device, repeats=repeats)


def passing_value(clause: tuple, params: tuple[float, ...]) -> float:
    _, _, op, rhs_is_value, param, value = clause
    rhs = value if rhs_is_value else params[param]
    return rhs + {"lt": -1.0, "le": 0.0, "gt": 1.0, "ge": 0.0, "eq": 0.0, "ne": 1.0}[T.OPS[op]]


def realistic_batch(n: int, gen: torch.Generator):
    """Seeds spread over every state with 0..199 epochs, and one request per seed in random
    order: ~55% moves along an edge of the seed's state with the guard met, 10% guarded moves
    with the metrics missing, 10% invalid edges, 10% stale from-states, 5% unknown seeds,
    10% duplicates (some moves also come too early: MIN_EPOCHS)."""
    policy = LifecyclePolicy.default()
    states = torch.randint(0, T.NUM_STATES, (n,), generator=gen)
    epochs = torch.randint(0, 200, (n,), generator=gen)
    ids = torch.randperm(n, generator=gen)
    current = states[ids]
    kind = torch.rand(n, generator=gen)
    # A random outgoing edge of each seed's state (FOSSILIZED has none: an invalid request);
    # the first tenth of the requests prefer a guarded edge and leave its metrics missing.
    out_edges = [[e for e, (a, _) in enumerate(T.EDGES) if a == s] or [-1] for s in range(T.NUM_STATES)]
    guarded_out = [[e for e in edges if e >= 0 and T.EDGE_GUARD[e] >= 0] or edges for edges in out_edges]
    pick = torch.rand(n, generator=gen).tolist()
    fail_guard = (kind < 0.10).tolist()
    edge = torch.tensor([
        (guarded_out if fail else out_edges)[s][int(p * len((guarded_out if fail else out_edges)[s]))]
        for s, p, fail in zip(current.tolist(), pick, fail_guard, strict=True)
    ])
    targets = torch.tensor([b for _, b in T.EDGES])
    # No outgoing edge: ask for a self-loop, which the lifecycle does not have.
    from_states, to_states = current.clone(), torch.where(edge >= 0, targets[edge.clamp(min=0)], current)
    context = torch.full((n, len(T.CONTEXT_FIELDS)), math.nan)
    for e, guard in enumerate(T.EDGE_GUARD):
        if guard >= 0:
            rows = (edge == e) & ~torch.tensor(fail_guard)
            clauses = [c for c in T.GUARD_CLAUSES[guard] if not c[0]]
            for clause in clauses[:1] if T.GUARD_IS_ANY[guard] else clauses:
                context[rows, clause[1]] = passing_value(clause, policy.params)
    invalid = (kind >= 0.10) & (kind < 0.20)
    to_states[invalid] = torch.randint(0, T.NUM_STATES, (int(invalid.sum()),), generator=gen)
    stale = (kind >= 0.20) & (kind < 0.30)
    from_states[stale] = (from_states[stale] + 1) % T.NUM_STATES
    unknown = (kind >= 0.30) & (kind < 0.35)
    ids[unknown] = n + torch.arange(int(unknown.sum()))
    dup = (kind >= 0.35) & (kind < 0.45)
    ids[dup] = ids[torch.randint(0, n, (int(dup.sum()),), generator=gen)]
    return states, epochs, ids, from_states.to(torch.int32), to_states.to(torch.int32), context


def bench_batched(n: int, args, report: Report, transitions_cost: float) -> None:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(n)
    states, epochs, ids, src, dst, ctx = realistic_batch(n, gen)
    st = ExtendedStateTensor(n, device=device)
    st.state[:, StateColumn.LIFECYCLE_STATE] = states.to(device, torch.int32)
    st.state[:, StateColumn.EPOCHS_IN_STATE] = epochs.to(device, torch.int32)
    ids, src, dst, ctx = ids.to(device), src.to(device), dst.to(device), ctx.to(device)
    saved = {k: v.clone() for k, v in st.state_dict().items()}
    min_epochs, params = LifecyclePolicy.default().tensors(device)

    def restore() -> None:
        st.state.copy_(saved["state"])
        st.history.copy_(saved["history"])
        st.history_count.copy_(saved["history_count"])

    codes = st.apply_transitions(ids, src, dst, ctx)
    mix = torch.bincount(codes.long().cpu(), minlength=len(T.REASON_NAMES)) / n
    restore()
    apply = measure_with_setup(restore, lambda: st.apply_transitions(ids, src, dst, ctx), device, args.repeats)
    ref = measure_with_setup(
        restore,
        lambda: _reference.apply_transitions(st.state, st.history, st.history_count, ids, src, dst, ctx, min_epochs, params),
        device,
        max(3, args.repeats // 4),
    )
    rate, _ = copy_rate(REQUEST_BYTES * n, device=device, repeats=args.repeats)
    bound = 2 * REQUEST_BYTES * n / rate
    report.add(
        f"apply_transitions N={n:,}",
        time=apply,
        seeds_per_s=n / apply.median,
        bound=bound / apply.median,
        bound_copy=copy_into(REQUEST_BYTES * n, device, args.repeats).median / apply.median,
        x_ref=ref.median / apply.median,
        x_transitions=(n / apply.median) * transitions_cost,
        spread=apply.spread,
    )
    if n == min(SIZES):
        report.note("request mix (share of reason codes): " + ", ".join(
            f"{name} {share:.0%}" for name, share in zip(T.REASON_NAMES, mix.tolist(), strict=True)))

    step = measure(st.step_epoch, device=device, repeats=args.repeats)
    ref_step = measure(lambda: _reference.step_epoch(st.state), device=device, repeats=max(3, args.repeats // 4))
    state_bytes = st.state.numel() * st.state.element_size()
    rate, _ = copy_rate(state_bytes, device=device, repeats=args.repeats)
    report.add(
        f"step_epoch N={n:,}",
        time=step,
        seeds_per_s=n / step.median,
        bound=(2 * state_bytes / rate) / step.median,
        bound_copy=copy_into(state_bytes, device, args.repeats).median / step.median,
        x_ref=ref_step.median / step.median,
        x_transitions=(n / step.median) * transitions_epoch_cost(),
        spread=step.spread,
    )


# ---- the transitions library, one Machine per seed ---------------------------------------------------


class _Seed:
    def __init__(self) -> None:
        self.epochs = 0
        self.error_count = 0


def _guard(seed: _Seed, edge: int, metrics: list[float], params: tuple[float, ...]) -> bool:
    guard = T.EDGE_GUARD[edge]
    results = []
    for is_builtin, lhs, op, rhs_is_value, param, value in T.GUARD_CLAUSES[guard]:
        left = (seed.epochs, seed.error_count)[lhs] if is_builtin else metrics[lhs]
        right = value if rhs_is_value else params[param]
        results.append({"lt": left < right, "le": left <= right, "gt": left > right, "ge": left >= right,
                        "eq": left == right, "ne": left != right}[T.OPS[op]])
    return any(results) if T.GUARD_IS_ANY[guard] else all(results)


def transitions_cost() -> tuple[float, float]:
    """(seconds per request, seeds) for the transitions library judging and applying the
    same request mix with one Machine per seed (guards as conditions)."""
    from transitions import Machine

    n = TRANSITIONS_SEEDS
    gen = torch.Generator().manual_seed(1)
    states, epochs, ids, src, dst, ctx = realistic_batch(n, gen)
    policy = LifecyclePolicy.default()
    seeds = []
    for s in range(n):
        seed = _Seed()
        seed.epochs = int(epochs[s])
        transitions = [
            {"trigger": f"go_{a}_{b}", "source": T.STATE_NAMES[a], "dest": T.STATE_NAMES[b],
             "conditions": [lambda metrics, _e=e, _s=seed: _guard(_s, _e, metrics, policy.params)]}
            for e, (a, b) in enumerate(T.EDGES)
        ]
        Machine(model=seed, states=list(T.STATE_NAMES), initial=T.STATE_NAMES[int(states[s])], transitions=transitions,
                auto_transitions=False)
        seeds.append(seed)
    requests = list(zip(ids.tolist(), src.tolist(), dst.tolist(), ctx.tolist(), strict=True))

    def run() -> None:
        counts: dict[int, int] = {}
        for seed_id, *_ in requests:
            counts[seed_id] = counts.get(seed_id, 0) + 1
        for seed_id, a, b, metrics in requests:
            if not 0 <= seed_id < n or counts[seed_id] > 1:
                continue
            seed = seeds[seed_id]
            if seed.state != T.STATE_NAMES[a] or T.EDGE_MATRIX[a][b] < 0:
                continue
            edge = T.EDGE_MATRIX[a][b]
            if not T.EDGE_BYPASS_MIN_EPOCHS[edge] and seed.epochs < policy.min_epochs[a]:
                continue
            if getattr(seed, f"go_{a}_{b}")(metrics=metrics):
                seed.epochs = 0

    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / n, n


_EPOCH_COST: list[float] = []


def transitions_epoch_cost() -> float:
    """Seconds per seed of advancing an epoch counter on one Python model object per seed."""
    if not _EPOCH_COST:
        seeds = [_Seed() for _ in range(TRANSITIONS_SEEDS)]

        def run() -> None:
            for seed in seeds:
                seed.epochs += 1

        _EPOCH_COST.append(measure(run, repeats=20).median / TRANSITIONS_SEEDS)
    return _EPOCH_COST[0]


# ---- single requests through the Python API ------------------------------------------------------


def bench_single(args, report: Report) -> None:
    device = torch.device(args.device)
    repeats = 2000 if args.quick else 20000
    st = ExtendedStateTensor(repeats + 100, device=device)
    manager = LifecycleManager(st)
    dormant, germinated = ExtendedLifecycle.DORMANT, ExtendedLifecycle.GERMINATED
    counter = iter(range(repeats + 100))

    def accepted() -> None:
        manager.request_transition(next(counter), dormant, germinated)

    ok = _latencies(accepted, repeats)
    refused = _latencies(lambda: manager.request_transition(0, dormant, germinated), repeats)  # stale: 0 moved
    guarded = _latencies(
        lambda: manager.request_transition(0, germinated, ExtendedLifecycle.FOSSILIZED, {"final_stability": 1.0}), repeats
    )
    query = _latencies(lambda: st.lifecycle_state(7), repeats)
    row = _latencies(lambda: st.get_state(7), repeats)
    for name, stats, target in (
        ("request_transition, accepted", ok, 20e-6),
        ("request_transition, refused (stale)", refused, None),
        ("request_transition, refused (invalid edge)", guarded, None),
        ("lifecycle_state(seed) query", query, 5e-6),
        ("get_state(seed) row copy", row, None),
    ):
        report.add(name, time=stats, p50_us=stats.median * 1e6, p99_us=stats.p99 * 1e6,
                   target_us=target * 1e6 if target else "", spread=stats.spread)


def _latencies(fn: Callable[[], object], repeats: int) -> Stats:
    """One sample per call (p50/p99 of single calls)."""
    for _ in range(50):
        fn()
    samples = []
    clock = time.perf_counter
    with _gc_paused():
        for _ in range(repeats):
            start = clock()
            fn()
            samples.append(clock() - start)
    return Stats(tuple(samples))


def main(argv: list[str] | None = None) -> int:
    args = parse_args("Lifecycle ops benchmark", argv)
    report = Report("lifecycle", "Lifecycle: batched ops and single requests", args)
    per_request, measured_at = transitions_cost()
    report.note(f"transitions library: {per_request * 1e6:.1f} µs per request, measured with one Machine per seed "
                f"at {measured_at:,} seeds (x_transitions compares per-seed throughput)")
    for n in QUICK_SIZES if args.quick else SIZES:
        bench_batched(n, args, report, per_request)
    bench_single(args, report)
    report.note("bound: the time a clone of the bytes the op touches takes / the op's time (1.0 = memory-copy rate); "
                "bound_copy: the same with a copy into an existing buffer (no allocation); "
                f"apply counts {REQUEST_BYTES} B per request, step_epoch the whole state tensor")
    report.note(f"noisy shared machine: the spread column is (p90 - p10) / median; median of {args.repeats} repeats")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())


"""Pure-torch versions of every kasmina op: the fallback when the extension is absent
and the oracle the compiled kernels are tested against. Results are identical to the
kernels' (same float32 comparisons, same reason codes)."""

from __future__ import annotations

from typing import Any

import torch

from ._generated import lifecycle_tables as _t

# ---- lifecycle ops ----------------------------------------------------------------

_INT32_MAX = torch.iinfo(torch.int32).max
_OPS = {
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "eq": torch.eq,
    # NaN compares false everywhere, `ne` included (torch.ne(nan, x) would be true).
    "ne": lambda a, b: torch.lt(a, b) | torch.gt(a, b),
}
_tables_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _lifecycle_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(edge matrix (S, S) int64, bypass per edge (E,) bool, guard id per edge (E,) int64)
    on ``device``, built once from the generated tables."""
    tables = _tables_cache.get(device)
    if tables is None:
        tables = (
            torch.tensor(_t.EDGE_MATRIX, dtype=torch.int64, device=device),
            torch.tensor(_t.EDGE_BYPASS_MIN_EPOCHS, dtype=torch.bool, device=device),
            torch.tensor(_t.EDGE_GUARD, dtype=torch.int64, device=device),
        )
        _tables_cache[device] = tables
    return tables


def _guard_holds(guard: int, context: torch.Tensor, builtins: tuple[torch.Tensor, torch.Tensor],
                 params: torch.Tensor) -> torch.Tensor:
    """Whether guard ``guard`` holds for every request (K,) bool, interpreting
    GUARD_CLAUSES; every comparison is made in float32."""
    results = []
    for lhs_is_builtin, lhs_index, op_index, rhs_is_value, rhs_param, rhs_value in _t.GUARD_CLAUSES[guard]:
        lhs = builtins[lhs_index] if lhs_is_builtin else context[:, lhs_index]
        rhs = torch.tensor(rhs_value, dtype=torch.float32, device=context.device) if rhs_is_value else params[rhs_param]
        results.append(_OPS[_t.OPS[op_index]](lhs, rhs))
    combined = torch.stack(results)
    return combined.any(dim=0) if _t.GUARD_IS_ANY[guard] else combined.all(dim=0)


def apply_transitions(
    state: torch.Tensor,
    history: torch.Tensor,
    history_count: torch.Tensor,
    seed_ids: torch.Tensor,
    from_states: torch.Tensor,
    to_states: torch.Tensor,
    context: torch.Tensor,
    min_epochs: torch.Tensor,
    params: torch.Tensor,
) -> torch.Tensor:
    """Judge K transition requests against the state before the batch and commit the
    accepted ones in place; returns one int32 reason code per request. Same rules and
    results as the compiled ``kasmina::apply_transitions`` (see csrc/lifecycle_step.h)."""
    num_seeds, num_states = state.shape[0], _t.NUM_STATES
    device = state.device
    k = seed_ids.shape[0]
    if k == 0:
        return torch.empty(0, dtype=torch.int32, device=device)
    edge_matrix, bypass, edge_guard = _lifecycle_tables(device)
    seed_ids = seed_ids.to(torch.int64)
    in_range = (seed_ids >= 0) & (seed_ids < num_seeds)
    safe_ids = torch.where(in_range, seed_ids, 0)
    occurrences = torch.bincount(safe_ids[in_range], minlength=num_seeds)[safe_ids]
    duplicate = in_range & (occurrences > 1)

    rows = state[safe_ids]
    current = rows[:, _t.StateColumn.LIFECYCLE_STATE].to(torch.int64)
    epochs = rows[:, _t.StateColumn.EPOCHS_IN_STATE]
    from64, to64 = from_states.to(torch.int64), to_states.to(torch.int64)
    stale = current != from64
    known = (current >= 0) & (current < num_states) & (to64 >= 0) & (to64 < num_states)
    edge = torch.where(known, edge_matrix[current.clamp(0, num_states - 1), to64.clamp(0, num_states - 1)], -1)
    invalid_edge = edge < 0
    safe_edge = edge.clamp(min=0)
    too_early = ~bypass[safe_edge] & (epochs < min_epochs[current.clamp(0, num_states - 1)])

    guard = edge_guard[safe_edge]
    guard_ok = torch.ones(k, dtype=torch.bool, device=device)
    builtins = (epochs.to(torch.float32), rows[:, _t.StateColumn.ERROR_COUNT].to(torch.float32))
    for g in range(len(_t.GUARD_NAMES)):
        guard_ok = torch.where(guard == g, _guard_holds(g, context, builtins, params), guard_ok)

    codes = torch.where(~guard_ok, int(_t.Reason.GUARD_FAILED), int(_t.Reason.OK))
    codes = torch.where(too_early, int(_t.Reason.MIN_EPOCHS), codes)
    codes = torch.where(invalid_edge, int(_t.Reason.INVALID_EDGE), codes)
    codes = torch.where(stale, int(_t.Reason.STALE_FROM_STATE), codes)
    codes = torch.where(duplicate, int(_t.Reason.DUPLICATE_IN_BATCH), codes)
    codes = torch.where(in_range, codes, int(_t.Reason.UNKNOWN_SEED)).to(torch.int32)

    accepted = codes == int(_t.Reason.OK)
    ids = seed_ids[accepted]
    src = from64[accepted].to(torch.int32)
    dst = to64[accepted].to(torch.int32)
    count = history_count[ids]
    # The slot is taken on the count as unsigned 32-bit, like the kernels.
    slot = (count.to(torch.int64) & 0xFFFFFFFF) % _t.HISTORY_LENGTH
    history[ids, slot] = torch.stack((src, dst), dim=1)
    history_count[ids] = torch.where(count == _INT32_MAX, count - (_t.HISTORY_LENGTH - 1), count + 1)
    state[ids, _t.StateColumn.PARENT_STATE] = src
    state[ids, _t.StateColumn.EPOCHS_IN_STATE] = 0
    state[ids, _t.StateColumn.LIFECYCLE_STATE] = dst
    return codes


def step_epoch(state: torch.Tensor) -> None:
    """Advance every seed's EPOCHS_IN_STATE by one, saturating at INT32_MAX, in place."""
    epochs = state.select(1, _t.StateColumn.EPOCHS_IN_STATE)
    epochs.add_((epochs < _INT32_MAX).to(epochs.dtype))


def state_summary(state: torch.Tensor) -> torch.Tensor:
    """Number of seeds in each state, int64 (NUM_STATES,); ids outside the spec are not counted."""
    current = state[:, _t.StateColumn.LIFECYCLE_STATE].to(torch.int64)
    known = (current >= 0) & (current < _t.NUM_STATES)
    return torch.bincount(current[known], minlength=_t.NUM_STATES)


# ---- chunked blend ----------------------------------------------------------------

BLEND_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def chunk_widths(dim: int, num_chunks: int) -> list[int]:
    """Widths of the ``num_chunks`` contiguous chunks of a last dimension of size ``dim``:
    the first ``dim % num_chunks`` chunks are one feature wider (DESIGN §4)."""
    q, r = divmod(dim, num_chunks)
    return [q + 1] * r + [q] * (num_chunks - r)


def check_num_chunks_type(num_chunks: Any, op: str = "chunked_blend") -> None:
    """TypeError unless ``num_chunks`` is an int (a SymInt while tracing; not a bool)."""
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int | torch.SymInt):
        raise TypeError(f"{op}: num_chunks must be an int, got {num_chunks!r}")


def check_blend_args(
    base: torch.Tensor, blueprint_out: torch.Tensor, alpha: torch.Tensor, num_chunks: int, op: str = "chunked_blend"
) -> None:
    """Raise ValueError (shapes, devices, ``num_chunks``) or TypeError (dtypes) naming the
    bad value, with the compiled kernels' messages (csrc/blend_args.h)."""
    check_num_chunks_type(num_chunks, op)
    if base.dim() < 1:
        raise ValueError(f"{op}: base must have at least one dimension (..., D), got a scalar")
    if base.dtype not in BLEND_DTYPES:
        raise TypeError(f"{op}: base has dtype {base.dtype}; supported are float32, float16, bfloat16 and float64")
    if blueprint_out.shape != base.shape:
        raise ValueError(
            f"{op}: blueprint_out has shape {list(blueprint_out.shape)} but base has shape {list(base.shape)}; "
            "they must match"
        )
    if blueprint_out.dtype != base.dtype:
        raise TypeError(f"{op}: blueprint_out has dtype {blueprint_out.dtype} but base has dtype {base.dtype}; they must match")
    if blueprint_out.device != base.device:
        raise ValueError(
            f"{op}: blueprint_out is on {blueprint_out.device} but base is on {base.device}; they must be on one device"
        )
    dim = base.shape[-1]
    if not 1 <= num_chunks <= dim:
        raise ValueError(f"{op}: num_chunks={num_chunks} must be between 1 and the last dimension D={dim}")
    if alpha.dim() != 1 or alpha.shape[0] != num_chunks:
        raise ValueError(f"{op}: alpha must have shape (num_chunks,)=({num_chunks},), got {list(alpha.shape)}")
    if not (alpha.dtype == torch.float32 or (alpha.dtype == torch.float64 and base.dtype == torch.float64)):
        raise TypeError(f"{op}: alpha has dtype {alpha.dtype}; it must be float32 (or float64 when base is float64)")
    if alpha.device != base.device:
        raise ValueError(f"{op}: alpha is on {alpha.device} but base is on {base.device}; they must be on one device")


def chunk_index(dim: int, num_chunks: int, device: torch.device) -> torch.Tensor:
    """Chunk of every feature of the last dimension, int64 (dim,)."""
    q, r = divmod(dim, num_chunks)
    wide_end = r * (q + 1)
    feature = torch.arange(dim, device=device)
    return torch.where(feature < wide_end, feature // (q + 1), r + (feature - wide_end) // q)


def chunked_blend(base: torch.Tensor, blueprint_out: torch.Tensor, alpha: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """``base + alpha[chunk] * (blueprint_out - base)`` over contiguous chunks of the last
    dimension, computed in float32 (float64 for float64 inputs) and differentiable.
    Chunks with alpha exactly 0 output ``base`` and pass no gradient to
    ``blueprint_out`` or ``alpha``, whatever ``blueprint_out`` holds there (NaN included)."""
    check_blend_args(base, blueprint_out, alpha, num_chunks)
    _, weight, active, b, p = _blend_operands(base, blueprint_out, alpha, num_chunks)
    return torch.where(active, b + weight * (p - b), b).to(base.dtype)


def _blend_operands(
    base: torch.Tensor, blueprint_out: torch.Tensor, alpha: torch.Tensor, num_chunks: int
) -> tuple[torch.Tensor, ...]:
    """(chunk of each feature, its weight, whether its chunk is active, base and
    blueprint_out) in the accumulation dtype. Inactive chunks see blueprint_out == base,
    so NaN there reaches neither the output nor any gradient."""
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    chunk = chunk_index(base.shape[-1], num_chunks, base.device)
    weight = alpha.to(acc)[chunk]
    active = weight != 0
    b = base.to(acc)
    return chunk, weight, active, b, torch.where(active, blueprint_out.to(acc), b)


def chunked_blend_backward(
    grad: torch.Tensor, base: torch.Tensor, blueprint_out: torch.Tensor, alpha: torch.Tensor, num_chunks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_base, grad_blueprint_out, grad_alpha) of :func:`chunked_blend` for ``grad``,
    in differentiable torch ops (what a double backward differentiates): ``grad * (1 -
    alpha)``, ``grad * alpha`` and the per-chunk sum of ``grad * (blueprint_out - base)``,
    both 0 where alpha is exactly 0, whatever ``blueprint_out`` or ``grad`` hold there."""
    chunk, weight, active, b, p = _blend_operands(base, blueprint_out, alpha, num_chunks)
    g, dim = grad.to(b.dtype), base.shape[-1]
    grad_base = torch.where(active, g * (1 - weight), g).to(base.dtype)  # alpha == 0 is constant there too
    grad_blueprint = torch.where(active, g * weight, 0.0).to(base.dtype)
    per_feature = torch.where(active, g * (p - b), 0.0).reshape(-1, dim).sum(0)
    grad_alpha = per_feature.new_zeros(num_chunks).index_add(0, chunk, per_feature).to(alpha.dtype)
    return grad_base, grad_blueprint, grad_alpha


# ---- telemetry --------------------------------------------------------------------


def chunk_moments(values: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """(2, num_chunks) float32: the mean of ``values`` and of its square over every row
    and every feature of each chunk (chunks as in :func:`chunk_widths`) of a (rows, dim)
    float32 tensor; NaN without rows."""
    rows, dim = values.shape
    # Column sums reduce along contiguous rows (far faster than a reduction over dim 0 per
    # chunk); then the wide chunks and the narrow ones are each one reshape.
    columns = torch.stack((values.sum(0), (values * values).sum(0)))
    q, r = divmod(dim, num_chunks)
    wide = columns[:, : r * (q + 1)].reshape(2, r, q + 1).sum(2) / ((q + 1) * rows)
    narrow = columns[:, r * (q + 1) :].reshape(2, num_chunks - r, q).sum(2) / (q * rows)
    return torch.cat((wide, narrow), 1)

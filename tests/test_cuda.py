"""Every kasmina op on CUDA against the CPU op: chunked_blend forward/backward in every
dtype and layout, apply_transitions / step_epoch / state_summary on random batches with
duplicates, chunk_moments. Skipped, with the reason shown, where no CUDA device is present."""

from __future__ import annotations

import math

import pytest
import torch

from kasmina import _reference, ops
from kasmina._extension import HAS_CUDA_KERNELS, HAS_EXTENSION
from kasmina._generated import lifecycle_tables as tables

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA kernels cannot run here"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT32_MAX = torch.iinfo(torch.int32).max


def test_cuda_kernels_are_built() -> None:
    assert HAS_EXTENSION and HAS_CUDA_KERNELS, (
        "a CUDA device is present but kasmina._C has no CUDA kernels; rebuild with "
        "KASMINA_CUDA=1 pip install --no-build-isolation -e ."
    )


# ---- chunked blend ------------------------------------------------------------------


def widths(dim: int, num_chunks: int) -> list[int]:
    return [dim // num_chunks + (1 if s < dim % num_chunks else 0) for s in range(num_chunks)]


def blend_inputs(shape, num_chunks, dtype, seed=0, zero_chunks=(), misaligned=False):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    bp = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    alpha = torch.rand(num_chunks, generator=gen, dtype=torch.float64)
    alpha = alpha.to(torch.float64 if dtype == torch.float64 else torch.float32)
    alpha[list(zero_chunks)] = 0.0
    start = 0
    for s, w in enumerate(widths(shape[-1], num_chunks)):  # garbage where the blueprint does not run
        if alpha[s] == 0:
            bp[..., start : start + w] = math.nan
        start += w
    return base, bp, alpha, grad, misaligned


def to_cuda(t: torch.Tensor, misaligned: int) -> torch.Tensor:
    """A contiguous CUDA copy starting ``misaligned`` elements past a 16-byte boundary."""
    if not misaligned:
        return t.cuda()
    storage = torch.empty(t.numel() + misaligned, dtype=t.dtype, device="cuda")
    out = storage[misaligned:].view(t.shape)
    out.copy_(t)
    return out


BLEND_CASES = [
    ((64, 256), 16, (3, 9), False),  # vectorised, chunks on vector boundaries
    ((5, 7, 40), 7, (0,), False),  # vectors straddle chunk boundaries
    ((33, 1023), 10, (1, 2), False),  # D not a multiple of the vector width
    ((8, 512), 512, (5, 100, 511), False),  # S == D
    ((300, 96), 4, (2,), 1),  # misaligned pointers: scalar path
    ((300, 96), 4, (2,), 2),  # two elements off: misaligned but for float64 (16 bytes: vectorised)
    ((3000, 64), 2, (), False),  # many rows: several partial rows of grad_alpha
    ((20000, 64), 3, (1,), False),  # more rows than one pass of the grid: the row loop strides
    ((2, 16384), 1024, tuple(range(0, 1024, 2)), False),  # half the chunks off, wide rows
    ((0, 32), 4, (), False),  # no rows
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "num_chunks", "zero_chunks", "misaligned"), BLEND_CASES)
def test_chunked_blend_cuda_matches_cpu(dtype, shape, num_chunks, zero_chunks, misaligned) -> None:
    base, bp, alpha, grad, mis = blend_inputs(shape, num_chunks, dtype, zero_chunks=zero_chunks, misaligned=misaligned)
    args = [to_cuda(t, mis) for t in (base, bp)] + [alpha.cuda()]
    out = torch.ops.kasmina.chunked_blend(*args, num_chunks)
    # Same formulas, each operation rounded on its own: the same bits as the CPU kernel.
    assert torch.equal(out.cpu(), torch.ops.kasmina.chunked_blend(base, bp, alpha, num_chunks))
    got = torch.ops.kasmina.chunked_blend_backward(to_cuda(grad, mis), *args, num_chunks, True, True, True)
    want = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, num_chunks, True, True, True)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    assert got[2].dtype == alpha.dtype and torch.isfinite(got[2]).all()
    tol = 1e-9 if dtype == torch.float64 else 1e-5 * math.sqrt(max(base.numel(), 1))
    torch.testing.assert_close(got[2].cpu(), want[2], rtol=tol, atol=tol)
    assert (got[2].cpu()[alpha == 0] == 0).all()


def test_chunked_blend_cuda_non_contiguous_inputs() -> None:
    base, bp, alpha, grad, _ = blend_inputs((24, 40), 5, torch.float32, zero_chunks=(3,))
    strided = [t.cuda().t().contiguous().t() for t in (base, bp, grad)]  # the same values, column-major
    assert not any(t.is_contiguous() for t in strided)
    out = torch.ops.kasmina.chunked_blend(strided[0], strided[1], alpha.cuda(), 5)
    assert torch.equal(out.cpu(), torch.ops.kasmina.chunked_blend(base, bp, alpha, 5))
    got = torch.ops.kasmina.chunked_blend_backward(strided[2], strided[0], strided[1], alpha.cuda(), 5, True, True, True)
    want = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, 5, True, True, True)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("needs", [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)], ids=str)
def test_chunked_blend_backward_cuda_flags(needs) -> None:
    base, bp, alpha, grad, _ = blend_inputs((40, 48), 5, torch.float32, zero_chunks=(1,))
    got = torch.ops.kasmina.chunked_blend_backward(grad.cuda(), base.cuda(), bp.cuda(), alpha.cuda(), 5, *map(bool, needs))
    want = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, 5, *map(bool, needs))
    for g, w, needed in zip(got, want, needs, strict=True):
        assert g.shape == w.shape and g.is_cuda
        if needed:
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-4)


def test_chunked_blend_cuda_float64_with_float32_alpha() -> None:
    base, bp, alpha, grad, _ = blend_inputs((10, 30), 3, torch.float64)
    alpha = alpha.float()
    got = torch.ops.kasmina.chunked_blend_backward(grad.cuda(), base.cuda(), bp.cuda(), alpha.cuda(), 3, True, True, True)
    want = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, 3, True, True, True)
    assert got[2].dtype == torch.float32
    torch.testing.assert_close(got[2].cpu(), want[2])


def test_chunked_blend_cuda_autograd_compile_and_opcheck() -> None:
    base, bp, alpha, _, _ = blend_inputs((6, 64), 8, torch.float32, zero_chunks=(2,))
    leaves = [t.cuda().requires_grad_(True) for t in (base, bp, alpha)]

    def step(b, p, a):
        return ops.chunked_blend(torch.tanh(b), p * 2, a, 8).square().sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        for leaf in leaves:
            leaf.grad = None
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), *(leaf.grad.clone() for leaf in leaves)))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(compiled).all()
    ref = _reference.chunked_blend(*(leaf.detach().cpu() for leaf in leaves), 8)
    torch.testing.assert_close(ops.chunked_blend(*(leaf.detach() for leaf in leaves), 8).cpu(), ref)
    args = [t.cuda() for t in blend_inputs((3, 17), 5, torch.float32)[:3]]
    torch.library.opcheck(torch.ops.kasmina.chunked_blend, (*(t.requires_grad_(True) for t in args), 5))


def test_chunked_blend_cuda_rejects_mixed_devices() -> None:
    base, bp, alpha, _, _ = blend_inputs((4, 8), 2, torch.float32)
    with pytest.raises(ValueError, match="alpha is on cpu"):
        torch.ops.kasmina.chunked_blend(base.cuda(), bp.cuda(), alpha, 2)
    with pytest.raises(ValueError, match="blueprint_out is on cpu"):
        torch.ops.kasmina.chunked_blend(base.cuda(), bp, alpha.cuda(), 2)


# ---- lifecycle ops ------------------------------------------------------------------


def random_lifecycle(num_seeds: int, seed: int):
    """A state tensor with every state id (and a few unknown ones), history buffers and
    counts near the saturation point."""
    gen = torch.Generator().manual_seed(seed)
    state = torch.zeros(num_seeds, len(tables.STATE_COLUMNS), dtype=torch.int32)
    state[:, tables.StateColumn.LIFECYCLE_STATE] = torch.randint(0, tables.NUM_STATES, (num_seeds,), generator=gen)
    state[:, tables.StateColumn.EPOCHS_IN_STATE] = torch.randint(0, 160, (num_seeds,), generator=gen)
    state[:, tables.StateColumn.ERROR_COUNT] = torch.randint(0, 9, (num_seeds,), generator=gen)
    state[:3, tables.StateColumn.EPOCHS_IN_STATE] = INT32_MAX
    state[-2:, tables.StateColumn.LIFECYCLE_STATE] = torch.tensor([-1, tables.NUM_STATES], dtype=torch.int32)
    history = torch.randint(0, tables.NUM_STATES, (num_seeds, tables.HISTORY_LENGTH, 2), generator=gen, dtype=torch.int32)
    count = torch.randint(0, 30, (num_seeds,), generator=gen, dtype=torch.int32)
    count[:2] = INT32_MAX
    return state, history, count


def random_requests(state: torch.Tensor, num_requests: int, seed: int, index_dtype: torch.dtype):
    """Requests with duplicates, unknown seeds, stale from-states, invalid edges and
    missing (NaN) metrics, mostly along real edges."""
    gen = torch.Generator().manual_seed(seed)
    n = state.shape[0]
    ids = torch.randint(-2, n + 2, (num_requests,), generator=gen)
    ids[: num_requests // 4] = torch.randint(0, max(n // 8, 1), (num_requests // 4,), generator=gen)  # duplicates
    current = state[ids.clamp(0, n - 1), tables.StateColumn.LIFECYCLE_STATE].to(torch.int64)
    from_states = torch.where(torch.rand(num_requests, generator=gen) < 0.9, current, (current + 1) % tables.NUM_STATES)
    edge_targets = torch.tensor([e[1] for e in tables.EDGES])
    edge_sources = torch.tensor([e[0] for e in tables.EDGES])
    to_states = torch.randint(-1, tables.NUM_STATES + 1, (num_requests,), generator=gen)
    for k in range(num_requests):  # most requests follow an edge out of their from-state
        outs = edge_targets[edge_sources == from_states[k]]
        if len(outs) and torch.rand(1, generator=gen).item() < 0.8:
            to_states[k] = outs[torch.randint(0, len(outs), (1,), generator=gen)]
    context = torch.rand(num_requests, len(tables.CONTEXT_FIELDS), generator=gen) * 1.2 - 0.1
    context[torch.rand(context.shape, generator=gen) < 0.2] = math.nan
    return ids, from_states.to(index_dtype), to_states.to(index_dtype), context


def policy_tensors():
    return (
        torch.tensor(tables.STATE_MIN_EPOCHS, dtype=torch.int32),
        torch.tensor(tables.PARAM_DEFAULTS, dtype=torch.float32),
    )


@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64), ids=str)
@pytest.mark.parametrize(("num_seeds", "num_requests"), [(50, 0), (50, 1), (64, 40), (1000, 3000), (5000, 700)])
def test_apply_transitions_cuda_matches_cpu(index_dtype, num_seeds, num_requests) -> None:
    state, history, count = random_lifecycle(num_seeds, seed=num_seeds)
    requests = random_requests(state, num_requests, seed=num_requests, index_dtype=index_dtype)
    min_epochs, params = policy_tensors()
    cpu = [t.clone() for t in (state, history, count)]
    gpu = [t.cuda() for t in (state, history, count)]
    codes_cpu = torch.ops.kasmina.apply_transitions(*cpu, *requests, min_epochs, params)
    codes_gpu = torch.ops.kasmina.apply_transitions(*gpu, *(t.cuda() for t in (*requests, min_epochs, params)))
    assert torch.equal(codes_gpu.cpu(), codes_cpu)
    for got, want in zip(gpu, cpu, strict=True):
        assert torch.equal(got.cpu(), want)
    if num_requests > 1:
        assert (codes_cpu == tables.Reason.DUPLICATE_IN_BATCH).any()
        assert (codes_cpu == tables.Reason.OK).any()


def test_apply_transitions_cuda_rejects_cpu_operands() -> None:
    state, history, count = random_lifecycle(10, seed=1)
    requests = random_requests(state, 4, seed=2, index_dtype=torch.int64)
    min_epochs, params = policy_tensors()
    with pytest.raises(RuntimeError, match="seed_ids must be on cuda"):
        torch.ops.kasmina.apply_transitions(state.cuda(), history.cuda(), count.cuda(), *requests, min_epochs, params)


@pytest.mark.parametrize("num_seeds", [0, 1, 77, 100_000])
def test_step_epoch_and_state_summary_cuda_match_cpu(num_seeds) -> None:
    state, _, _ = random_lifecycle(max(num_seeds, 3), seed=7)
    state = state[:num_seeds].contiguous()
    gpu = state.cuda()
    for _ in range(2):
        torch.ops.kasmina.step_epoch(state)
        torch.ops.kasmina.step_epoch(gpu)
    assert torch.equal(gpu.cpu(), state)
    assert torch.equal(torch.ops.kasmina.state_summary(gpu).cpu(), torch.ops.kasmina.state_summary(state))
    if num_seeds >= 3:
        assert (state[:3, tables.StateColumn.EPOCHS_IN_STATE] == INT32_MAX).all()  # saturated, not wrapped


# ---- telemetry ----------------------------------------------------------------------


def test_chunk_moments_cuda_matches_cpu() -> None:
    """No CUDA kernel: CUDA tensors take the pure-torch version, which must agree."""
    values = torch.randn(300, 1000, generator=torch.Generator().manual_seed(4))
    on_gpu = ops.chunk_moments(values.cuda(), 7)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), ops.chunk_moments(values, 7), rtol=1e-5, atol=1e-6)

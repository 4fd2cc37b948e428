"""kasmina.ops.chunked_blend: the compiled CPU kernels and the pure-torch reference
against an independent float64 composite, the alpha == 0 rule, dtypes, layouts, errors,
autograd, opcheck and torch.compile."""

from __future__ import annotations

import itertools
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kasmina import _reference, ops
from kasmina._extension import HAS_EXTENSION

Blend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

IMPLS: dict[str, Blend] = {"public": ops.chunked_blend, "reference": _reference.chunked_blend}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Tolerance of one rounding to the dtype (results are computed in float32/float64).
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
}
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")


def widths(dim: int, num_chunks: int) -> list[int]:
    """Chunk widths written out independently of the library."""
    return [dim // num_chunks + (1 if s < dim % num_chunks else 0) for s in range(num_chunks)]


def composite64(
    base: torch.Tensor, bp: torch.Tensor, alpha: torch.Tensor, num_chunks: int, grad: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Output (and gradients for ``grad``) in float64, chunk by chunk with Python slices."""
    b, p, a = base.double(), bp.double(), alpha.double()
    out = b.clone()
    grads = (torch.zeros_like(b), torch.zeros_like(b), torch.zeros_like(a))
    g = None if grad is None else grad.double()
    start = 0
    for s, w in enumerate(widths(base.shape[-1], num_chunks)):
        sl = slice(start, start + w)
        start += w
        if g is not None:
            grads[0][..., sl] = g[..., sl] * (1 - a[s])
        if a[s] == 0:
            if g is not None:
                grads[0][..., sl] = g[..., sl]
            continue
        out[..., sl] = b[..., sl] + a[s] * (p[..., sl] - b[..., sl])
        if g is not None:
            grads[1][..., sl] = g[..., sl] * a[s]
            grads[2][s] = (g[..., sl] * (p[..., sl] - b[..., sl])).sum()
    return (out, *grads) if g is not None else (out,)


def make_inputs(
    shape: tuple[int, ...], num_chunks: int, dtype: torch.dtype, seed: int = 0, zero_chunks: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    bp = torch.randn(shape, generator=gen).to(dtype)
    alpha_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = torch.rand(num_chunks, generator=gen, dtype=torch.float64).to(alpha_dtype)
    alpha[list(zero_chunks)] = 0.0
    return base, bp, alpha


def poison(bp: torch.Tensor, alpha: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """blueprint_out with NaN in every chunk whose alpha is 0."""
    bp = bp.clone()
    start = 0
    for s, w in enumerate(widths(bp.shape[-1], num_chunks)):
        if alpha[s] == 0:
            bp[..., start : start + w] = math.nan
        start += w
    return bp


def blend_with_grads(
    impl: Blend, base: torch.Tensor, bp: torch.Tensor, alpha: torch.Tensor, num_chunks: int, grad: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().clone().requires_grad_(True) for t in (base, bp, alpha)]
    out = impl(*leaves, num_chunks)
    out.backward(grad)
    return (out.detach(), *(t.grad for t in leaves))


CASES = [
    ((4, 32), 4),  # D divisible by S
    ((3, 5, 37), 6),  # D % S != 0, leading dims 2
    ((7, 16), 16),  # S == D
    ((2, 9), 1),  # one chunk
    ((40,), 3),  # no leading dims
    ((2, 3, 4, 1000), 7),  # several tasks on the CPU
]


@pytest.mark.parametrize("impl", IMPLS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "num_chunks"), CASES)
def test_forward_and_backward_match_float64_composite(impl, dtype, shape, num_chunks) -> None:
    base, bp, alpha = make_inputs(shape, num_chunks, dtype, zero_chunks=(0,) if num_chunks > 1 else ())
    alpha[-1] = 1.0
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, gb, gp, ga = blend_with_grads(IMPLS[impl], base, bp, alpha, num_chunks, grad)
    want = composite64(base, bp, alpha, num_chunks, grad)
    assert out.dtype == dtype and out.shape == base.shape and ga.dtype == alpha.dtype
    for got, expected in zip((out, gb, gp), want[:3], strict=True):
        torch.testing.assert_close(got.double(), expected, **TOL[dtype])
    # grad_alpha sums many rounded products: scale the tolerance with the chunk size.
    count = base.numel() / num_chunks
    tol = 1e-10 if dtype == torch.float64 else 1e-4 * math.sqrt(count) * (10 if dtype != torch.float32 else 1)
    torch.testing.assert_close(ga.double(), want[3], rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_alpha_zero_chunks_never_use_blueprint_out(impl, dtype) -> None:
    shape, num_chunks = (3, 4, 23), 5
    base, bp, alpha = make_inputs(shape, num_chunks, dtype, seed=3, zero_chunks=(1, 4))
    alpha[2] = -0.0  # negative zero is zero too
    bp = poison(bp, alpha, num_chunks)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    out, gb, gp, ga = blend_with_grads(IMPLS[impl], base, bp, alpha, num_chunks, grad)
    assert torch.isfinite(out).all() and torch.isfinite(gb).all() and torch.isfinite(gp).all()
    assert torch.isfinite(ga).all()
    want = composite64(base, bp, alpha, num_chunks, grad)
    start = 0
    for s, w in enumerate(widths(shape[-1], num_chunks)):
        sl = slice(start, start + w)
        start += w
        if alpha[s] == 0:
            assert torch.equal(out[..., sl], base[..., sl])
            assert torch.equal(gb[..., sl], grad[..., sl])
            assert torch.equal(gp[..., sl], torch.zeros_like(gp[..., sl]))
            assert ga[s].item() == 0.0
        else:
            torch.testing.assert_close(out[..., sl].double(), want[0][..., sl], **TOL[dtype])


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_all_chunks_zero_returns_base(impl) -> None:
    base, bp, alpha = make_inputs((5, 12), 3, torch.float32)
    alpha.zero_()
    assert torch.equal(IMPLS[impl](base, torch.full_like(bp, math.nan), alpha, 3), base)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_forward_is_bitwise_equal_to_reference(dtype) -> None:
    base, bp, alpha = make_inputs((6, 9, 130), 13, dtype, seed=5, zero_chunks=(2, 7))
    out = torch.ops.kasmina.chunked_blend(base, bp, alpha, 13)
    assert torch.equal(out, _reference.chunked_blend(base, bp, alpha, 13))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int64 if tensor.dtype == torch.float64 else torch.int32)


@needs_extension
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize(
    ("rows", "dim", "num_chunks", "zero_chunks"),
    [
        (70, 1024, 256, tuple(range(0, 256, 2))),  # chunks of 4 features: every vector mixed
        (8, 9000, 2250, tuple(range(1, 2250, 2))),  # few rows: rows cut into 8192-feature tiles
        (70, 5000, 1250, tuple(range(0, 1250, 2))),  # grad_alpha's tiles cut columns (4096 / 2048)
        (70, 1031, 9, (0, 3, 4, 8)),  # odd width: rows start unaligned, boundaries inside vectors
        (70, 4099, 4, (1, 3)),  # long runs: whole vectors active or inactive
        (70, 1030, 7, ()),  # every chunk active
    ],
    ids=("narrow", "few-rows", "column-tiles", "mixed", "wide", "all-active"),
)
def test_row_loops_equal_the_reference(dtype, rows, dim, num_chunks, zero_chunks) -> None:
    """Float32/float64 calls (the AVX2 row loops where the machine has AVX2) give the
    reference's bits, -0.0 and inf of base and grad too, and read no NaN of an alpha == 0
    chunk (+0.0 or -0.0); a NaN alpha is an active chunk.
    test_other_loops_give_the_same_bits compares the portable loops with them."""
    shape = (rows, dim)
    base, bp, alpha = make_inputs(shape, num_chunks, dtype, seed=dim, zero_chunks=zero_chunks)
    alpha[list(zero_chunks[::2])] = -0.0
    alpha[min(set(range(num_chunks)) - set(zero_chunks))] = math.nan
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(dim)).to(dtype)
    bp = poison(bp, alpha, num_chunks)
    off = torch.isnan(bp)  # the alpha == 0 features
    for tensor, values in ((base, (-0.0, math.inf)), (grad, (-2.0, -math.inf))):
        tensor[0::2][off[0::2]] = values[0]
        tensor[1::2][off[1::2]] = values[1]
    out = torch.ops.kasmina.chunked_blend(base, bp, alpha, num_chunks)
    assert torch.equal(bits(out), bits(_reference.chunked_blend(base, bp, alpha, num_chunks)))
    want = _reference.chunked_blend_backward(grad, base, bp, alpha, num_chunks)
    got = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, num_chunks, True, True, True)
    assert torch.equal(bits(got[0]), bits(want[0])) and torch.equal(bits(got[1]), bits(want[1]))
    assert torch.isfinite(got[2]).all() and (got[2][list(zero_chunks)] == 0).all()
    torch.testing.assert_close(got[2], want[2], rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-3)
    for needs in ((True, False, False), (False, True, False), (False, False, True)):
        part = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, num_chunks, *needs)
        for need, value, full in zip(needs, part, got, strict=True):
            assert torch.equal(bits(value), bits(full)) if need else value.numel() == 0


# Computes every case of the file argv[1] with the kernels and saves the results to argv[2],
# under the KASMINA_STREAM_MIN_BYTES and KASMINA_CPU_AVX2_ROWS the parent sets.
_CHILD = """
import sys, torch, kasmina
cases = torch.load(sys.argv[1])
results = {"threshold": torch.ops.kasmina.blend_stream_cache_bytes(),
           "avx2_rows": torch.ops.kasmina.blend_avx2_rows(), "outputs": []}
for base, bp, alpha, grad, num_chunks, needs in cases:
    results["outputs"].append((
        torch.ops.kasmina.chunked_blend(base, bp, alpha, num_chunks),
        torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, num_chunks, *needs),
    ))
results["streamed_calls"] = torch.ops.kasmina.blend_streamed_calls()
torch.save(results, sys.argv[2])
"""

NEVER_STREAM = str(2**62)  # a cache size no call and no output's reuse distance exceeds
STREAMS = platform.machine().lower() in ("x86_64", "amd64")  # non-temporal stores exist


def _loop_cases() -> list[tuple]:
    masks = [(a, b, c) for a in (False, True) for b in (False, True) for c in (False, True) if a or b or c]
    cases = []
    # Odd widths (rows start unaligned), runs longer than the portable loops' 512-element
    # stage, alpha == 0 runs (their copies and zero fills are streamed too), and chunks of a
    # few features (vectors of the AVX2 loops holding active and inactive features).
    layouts = (
        ((5, 37), 6, (1,)),
        ((3, 3000), 3, (1,)),
        ((2, 4099), 64, (0, 5, 63)),
        ((3, 1029), 343, (0, 2, 4, 9)),
        ((64, 4099), 1025, (0, 3, 4, 700)),  # outputs of 1 MiB or more: cache blocks apart in their pages
    )
    for dtype in DTYPES:
        for shape, num_chunks, zero in layouts:
            base, bp, alpha = make_inputs(shape, num_chunks, dtype, seed=len(cases), zero_chunks=zero)
            grad = torch.randn(shape, generator=torch.Generator().manual_seed(len(cases))).to(dtype)
            for needs in masks if dtype == torch.float32 else masks[-1:]:
                cases.append((base, poison(bp, alpha, num_chunks), alpha, grad, num_chunks, needs))
    return cases


def _run_child(tmp: Path, name: str, settings: dict[str, str]) -> dict:
    """What a child process under `settings` computes for the cases saved in tmp/cases.pt."""
    out = tmp / f"{name}.pt"
    cases_file = tmp / "cases.pt"
    env = {**os.environ, **settings}
    subprocess.run([sys.executable, "-c", _CHILD, str(cases_file), str(out)], env=env, check=True, timeout=300)
    return torch.load(out)


@pytest.fixture(scope="module")
def unstreamed_results(tmp_path_factory) -> tuple[Path, list[tuple], dict]:
    """The cases, and what a child that never streams computes for them."""
    tmp = tmp_path_factory.mktemp("loops")
    cases = _loop_cases()
    torch.save(cases, tmp / "cases.pt")
    results = _run_child(tmp, "unstreamed", {"KASMINA_STREAM_MIN_BYTES": NEVER_STREAM})
    assert results["threshold"] == int(NEVER_STREAM) and results["streamed_calls"] == 0
    assert results["avx2_rows"] == torch.ops.kasmina.blend_avx2_rows()
    return tmp, cases, results


@needs_extension
@pytest.mark.parametrize(
    "settings",
    [
        {"KASMINA_STREAM_MIN_BYTES": "0"},
        {"KASMINA_STREAM_MIN_BYTES": NEVER_STREAM, "KASMINA_CPU_AVX2_ROWS": "0"},
        {"KASMINA_STREAM_MIN_BYTES": "0", "KASMINA_CPU_AVX2_ROWS": "0"},
    ],
    ids=("streamed", "portable", "portable-streamed"),
)
def test_other_loops_give_the_same_bits(unstreamed_results, settings: dict[str, str]) -> None:
    """Calls write their outputs with non-temporal stores when they are larger than the
    last-level cache or their output memory has likely left it, and machines without AVX2
    take the portable loops; streaming every call, or none, with either loops (each in a
    child process) changes no bit of the results."""
    if "KASMINA_CPU_AVX2_ROWS" in settings and not torch.ops.kasmina.blend_avx2_rows():
        pytest.skip("this machine has no AVX2 row loops: every process runs the portable loops already")
    tmp, cases, cached = unstreamed_results
    results = _run_child(tmp, "-".join(f"{k}={v}" for k, v in settings.items()), settings)
    assert results["threshold"] == int(settings["KASMINA_STREAM_MIN_BYTES"])
    streams = settings["KASMINA_STREAM_MIN_BYTES"] == "0"
    assert results["streamed_calls"] == (2 * len(cases) if streams and STREAMS else 0)
    assert results["avx2_rows"] == ("KASMINA_CPU_AVX2_ROWS" not in settings and torch.ops.kasmina.blend_avx2_rows())
    for (out, grads), (cached_out, cached_grads) in zip(results["outputs"], cached["outputs"], strict=True):
        assert torch.equal(out, cached_out)
        for got, expected in zip(grads, cached_grads, strict=True):
            assert torch.equal(got, expected)


# Runs the calls test_outputs_stream_when_their_memory_left_the_cache describes and prints
# blend_streamed_calls after each, under KASMINA_STREAM_MIN_BYTES=16 MiB.
_REUSE_CHILD = """
import torch, kasmina
calls = torch.ops.kasmina.blend_streamed_calls
base, bp, grad = (torch.randn(128, 4096) for _ in range(3))  # 2 MiB each
alpha = torch.rand(8)
seen = []
def forward():
    torch.ops.kasmina.chunked_blend(base, bp, alpha, 8)  # 6 MiB moved, output freed at once
    seen.append(calls())
forward(); forward(); forward()
grads = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, 8, True, True, True)  # 10 MiB
seen.append(calls())
del grads
forward(); forward()
big = torch.ops.kasmina.chunked_blend(*(torch.randn(512, 4096) for _ in range(2)), alpha, 8)  # 24 MiB
seen.append(calls())
print(seen)
"""


@needs_extension
@pytest.mark.skipif(not STREAMS, reason="this machine has no non-temporal stores: blend calls never stream")
@pytest.mark.parametrize(("cache_bytes", "expected"), [(None, [0, 0, 0, 0, 1, 1, 2]), ("0", [0, 0, 0, 0, 0, 0, 1])])
def test_outputs_stream_when_their_memory_left_the_cache(cache_bytes, expected) -> None:
    """With a 16 MiB cache: forwards back to back reuse one output block written 6 MiB of
    blend traffic earlier (cached stores); the backward takes that block and a new one; the
    forward after it takes a block written 10 MiB earlier (streamed), the next one the block
    that forward wrote (cached); a call moving more than the cache streams whatever its
    output. Without the output cache no output has a known past, so only the size counts."""
    env = {k: v for k, v in os.environ.items() if k != "KASMINA_CPU_OUTPUT_CACHE_BYTES"}
    env["KASMINA_STREAM_MIN_BYTES"] = str(16 << 20)
    if cache_bytes is not None:
        env["KASMINA_CPU_OUTPUT_CACHE_BYTES"] = cache_bytes
    done = subprocess.run([sys.executable, "-c", _REUSE_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(expected)


@needs_extension
@pytest.mark.parametrize(
    ("name", "value", "op", "message"),
    [
        ("KASMINA_STREAM_MIN_BYTES", "lots", "blend_stream_cache_bytes", "is not a byte count"),
        ("KASMINA_CPU_AVX2_ROWS", "yes", "blend_avx2_rows", "is not a switch; use 0 or 1"),
    ],
)
def test_bad_settings_are_clear_errors(name, value, op, message) -> None:
    env = {**os.environ, name: value}
    code = f"import torch, kasmina; torch.ops.kasmina.{op}()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"{name}={value} {message}" in done.stderr


@needs_extension
@pytest.mark.parametrize("needs", [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)], ids=str)
def test_backward_op_computes_only_what_is_asked(needs) -> None:
    shape, num_chunks = (4, 30), 4
    base, bp, alpha = make_inputs(shape, num_chunks, torch.float32, zero_chunks=(1,))
    grad = torch.randn(shape)
    gb, gp, ga = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, num_chunks, *map(bool, needs))
    want = composite64(base, bp, alpha, num_chunks, grad)[1:]
    for got, expected, needed in zip((gb, gp, ga), want, needs, strict=True):
        if needed:
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        else:
            assert got.numel() == 0


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eager_autograd_path_equals_registered_autograd(dtype) -> None:
    """ops.chunked_blend applies the autograd formula directly in eager mode; the op
    called through the dispatcher uses the one registered with register_autograd."""
    base, bp, alpha = make_inputs((4, 3, 45), 7, dtype, seed=9, zero_chunks=(3,))
    grad = torch.randn(base.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    eager = blend_with_grads(ops.chunked_blend, base, poison(bp, alpha, 7), alpha, 7, grad)
    registered = blend_with_grads(torch.ops.kasmina.chunked_blend, base, poison(bp, alpha, 7), alpha, 7, grad)
    for got, want in zip(eager, registered, strict=True):
        assert torch.equal(got, want)


@needs_extension
@pytest.mark.parametrize("requires", [(True, False, False), (False, True, False), (False, False, True)], ids=str)
def test_autograd_asks_only_for_needed_gradients(requires) -> None:
    base, bp, alpha = make_inputs((3, 10), 2, torch.float64)
    leaves = [t.clone().requires_grad_(r) for t, r in zip((base, bp, alpha), requires, strict=True)]
    ops.chunked_blend(*leaves, 2).sum().backward()
    for leaf, r in zip(leaves, requires, strict=True):
        assert (leaf.grad is not None) == r


@pytest.mark.parametrize("impl", IMPLS, ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_non_contiguous_inputs(impl, dtype) -> None:
    num_chunks = 5
    big = torch.randn(2, 33, 8, generator=torch.Generator().manual_seed(9)).to(dtype)
    base = big[0].t()  # (8, 33) transposed
    bp = torch.randn(8, 66, generator=torch.Generator().manual_seed(10)).to(dtype)[:, ::2]  # strided last dim
    alpha = torch.tensor([0.2, 0.0, 1.0, 0.5, 0.9]).repeat(2)[::2]  # strided alpha
    grad = torch.randn(33, 8).to(dtype).t()
    out, gb, gp, ga = blend_with_grads(IMPLS[impl], base, bp, alpha, num_chunks, grad)
    want = composite64(base, bp, alpha, num_chunks, grad)
    for got, expected in zip((out, gb, gp), want[:3], strict=True):
        torch.testing.assert_close(got.double(), expected, **TOL[dtype])
    torch.testing.assert_close(ga.double(), want[3], rtol=5e-2, atol=5e-2)


def _error_cases() -> list[tuple[str, Callable[[], tuple], type[Exception], str]]:
    b = torch.randn(4, 10)
    a = torch.rand(5)
    return [
        ("scalar", lambda: (torch.tensor(1.0), torch.tensor(1.0), torch.rand(1), 1), ValueError, "at least one dimension"),
        ("shape", lambda: (b, torch.randn(4, 11), a, 5), ValueError, "blueprint_out has shape"),
        ("dtype", lambda: (b, b.double(), a, 5), TypeError, "blueprint_out has dtype"),
        ("int", lambda: (b.int(), b.int(), a, 5), TypeError, "supported are float32"),
        ("alpha_len", lambda: (b, b, torch.rand(4), 5), ValueError, "alpha must have shape"),
        ("alpha_2d", lambda: (b, b, torch.rand(5, 1), 5), ValueError, "alpha must have shape"),
        ("alpha_dtype", lambda: (b, b, a.double(), 5), TypeError, "alpha has dtype"),
        ("alpha_half", lambda: (b.half(), b.half(), a.half(), 5), TypeError, "alpha has dtype"),
        ("zero_chunks", lambda: (b, b, torch.rand(0), 0), ValueError, "num_chunks=0"),
        ("negative_chunks", lambda: (b, b, a, -1), ValueError, "num_chunks=-1"),
        ("bool_chunks", lambda: (b, b, torch.rand(1), True), TypeError, "num_chunks must be an int, got True"),
        ("float_chunks", lambda: (b, b, a, 5.0), TypeError, "num_chunks must be an int, got 5.0"),
        ("too_many_chunks", lambda: (b, b, torch.rand(11), 11), ValueError, "num_chunks=11"),
        ("meta_bp", lambda: (b, torch.empty(4, 10, device="meta"), a, 5), ValueError, "blueprint_out is on meta"),
        ("meta_alpha", lambda: (b, b, torch.empty(5, device="meta"), 5), ValueError, "alpha is on meta"),
    ]


ERROR_CASES = _error_cases()


@pytest.mark.parametrize("impl", IMPLS, ids=str)
@pytest.mark.parametrize(("make", "error", "match"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_arguments_raise_clear_errors(impl, make, error, match) -> None:
    with pytest.raises(error, match=match):
        IMPLS[impl](*make())


@needs_extension
def test_backward_rejects_mismatched_grad() -> None:
    base, bp, alpha = make_inputs((4, 10), 5, torch.float32)
    with pytest.raises(ValueError, match="grad has shape"):
        torch.ops.kasmina.chunked_blend_backward(torch.randn(4, 9), base, bp, alpha, 5, True, True, True)
    with pytest.raises(TypeError, match="grad has dtype"):
        torch.ops.kasmina.chunked_blend_backward(torch.randn(4, 10).double(), base, bp, alpha, 5, True, True, True)


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_gradcheck_float64(impl) -> None:
    base, bp, alpha = make_inputs((3, 2, 11), 4, torch.float64, seed=11)
    alpha = alpha * 0.8 + 0.1  # away from 0, where the blend switches the blueprint off on purpose
    inputs = tuple(t.clone().requires_grad_(True) for t in (base, bp, alpha))
    assert torch.autograd.gradcheck(lambda b, p, a: IMPLS[impl](b, p, a, 4), inputs)


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_gradgradcheck_float64(impl) -> None:
    base, bp, alpha = make_inputs((3, 2, 11), 4, torch.float64, seed=12)
    alpha = alpha * 0.8 + 0.1
    inputs = tuple(t.clone().requires_grad_(True) for t in (base, bp, alpha))
    assert torch.autograd.gradgradcheck(lambda b, p, a: IMPLS[impl](b, p, a, 4), inputs)


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_double_backward_ignores_alpha_zero_chunks(impl) -> None:
    base, bp, alpha = make_inputs((4, 13), 3, torch.float64, seed=13, zero_chunks=(1,))
    leaves = [t.clone().requires_grad_(True) for t in (base, poison(bp, alpha, 3), alpha)]
    out = IMPLS[impl](*leaves, 3)
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    second = torch.autograd.grad(sum(g.sum() for g in grads), leaves)
    reference = _reference.chunked_blend(*leaves, 3)
    expected = torch.autograd.grad(
        sum(g.sum() for g in torch.autograd.grad(reference.square().sum(), leaves, create_graph=True)), leaves
    )
    for got, want in zip(second, expected, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


@needs_extension
@pytest.mark.parametrize(
    ("shape", "num_chunks", "dtype"),
    [((4, 300000), 13, torch.float32), ((1024, 1024), 7, torch.float64), ((40, 9000), 1000, torch.float32)],
    ids=str,
)
def test_grad_alpha_does_not_depend_on_the_thread_count(shape, num_chunks, dtype) -> None:
    base, bp, alpha = make_inputs(shape, num_chunks, dtype, seed=14)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(15)).to(dtype)
    before = torch.get_num_threads()
    sums = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            sums.append(torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, num_chunks, False, False, True)[2])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])


@needs_extension
def test_opcheck() -> None:
    for dtype in (torch.float32, torch.float64):
        base, bp, alpha = make_inputs((3, 17), 5, dtype, zero_chunks=(2,))
        args = (base.requires_grad_(True), bp.requires_grad_(True), alpha.requires_grad_(True), 5)
        torch.library.opcheck(torch.ops.kasmina.chunked_blend, args)
    base, bp, alpha = make_inputs((2, 3, 8), 8, torch.bfloat16)
    torch.library.opcheck(torch.ops.kasmina.chunked_blend, (base, bp, alpha, 8))
    grad = torch.randn(2, 3, 8).to(torch.bfloat16)
    for needs in itertools.product((False, True), repeat=3):  # outputs that are not needed must not alias
        torch.library.opcheck(torch.ops.kasmina.chunked_blend_backward, (grad, base, bp, alpha, 8, *needs))


def _train_step(blend: Blend, base, bp, alpha, num_chunks):
    out = blend(torch.tanh(base), bp * 2, alpha, num_chunks)
    return out.square().sum()


@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_torch_compile_fullgraph_matches_eager(impl) -> None:
    torch._dynamo.reset()
    base, bp, alpha = make_inputs((6, 40), 6, torch.float32, seed=12, zero_chunks=(3,))
    bp = poison(bp, alpha, 6)

    def step(b, p, a):
        return _train_step(IMPLS[impl], b, p, a, 6)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (base, bp, alpha)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), *(t.grad for t in leaves)))
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(comp).all()


@needs_extension
def test_compiled_reference_equals_kernel() -> None:
    torch._dynamo.reset()
    base, bp, alpha = make_inputs((5, 3, 29), 7, torch.float32, seed=13, zero_chunks=(0, 6))
    bp = poison(bp, alpha, 7)
    compiled_reference = torch.compile(_reference.chunked_blend, fullgraph=True)
    torch.testing.assert_close(
        compiled_reference(base, bp, alpha, 7), torch.ops.kasmina.chunked_blend(base, bp, alpha, 7), rtol=1e-6, atol=1e-6
    )


@needs_extension
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "no_input_requires_grad"])
def test_no_grad_calls_skip_autograd_and_match(context) -> None:
    base, bp, alpha = make_inputs((3, 5, 26), 6, torch.float32, seed=14, zero_chunks=(2,))
    bp = poison(bp, alpha, 6)
    want = torch.ops.kasmina.chunked_blend(base, bp, alpha, 6)
    guard = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context, torch.enable_grad)
    with guard():
        got = ops.chunked_blend(base, bp, alpha, 6)
    assert torch.equal(got, want)
    assert not got.requires_grad and got.grad_fn is None
    with torch.no_grad():
        compiled = torch.compile(lambda b, p, a: ops.chunked_blend(b, p, a, 6), fullgraph=True)
        assert torch.equal(compiled(base, bp, alpha), want)
    # One input requiring grad is enough for the autograd path.
    leaf = alpha.clone().requires_grad_(True)
    out = ops.chunked_blend(base, bp, leaf, 6)
    assert out.grad_fn is not None
    (grad_alpha,) = torch.autograd.grad(out.sum(), leaf)
    assert torch.isfinite(grad_alpha).all() and grad_alpha[2] == 0


@needs_extension
def test_public_entry_uses_the_kernel_on_cpu() -> None:
    assert ops.compiled_serves(torch.empty(1))


@st.composite
def blend_problems(draw):
    leading = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
    dim = draw(st.integers(1, 40))
    num_chunks = draw(st.one_of(st.just(dim), st.integers(1, dim)))
    zero = draw(st.lists(st.booleans(), min_size=num_chunks, max_size=num_chunks))
    seed = draw(st.integers(0, 2**16))
    return (*leading, dim), num_chunks, zero, seed


@settings(max_examples=60, deadline=None)
@given(blend_problems())
def test_random_shapes_match_composite(problem) -> None:
    shape, num_chunks, zero, seed = problem
    base, bp, alpha = make_inputs(shape, num_chunks, torch.float32, seed=seed)
    alpha[torch.tensor(zero)] = 0.0
    bp = poison(bp, alpha, num_chunks)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    want = composite64(base, bp, alpha, num_chunks, grad)
    results = {name: blend_with_grads(impl, base, bp, alpha, num_chunks, grad) for name, impl in IMPLS.items()}
    assert torch.equal(results["public"][0], results["reference"][0])
    for got in results.values():
        for value, expected in zip(got, want, strict=True):
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)

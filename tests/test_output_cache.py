"""The CPU blend outputs' memory cache (csrc/output_cache.h): freed outputs of 1 MiB or
more are reused for the next output of the same size, up to a limit, and a reused block
never shows its old contents."""

from __future__ import annotations

import gc
import itertools
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

from kasmina import _reference, ops
from kasmina._extension import HAS_EXTENSION

MIB = 1 << 20
pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")
# The tests in this process need the cache on with room for a few outputs.
needs_cache = pytest.mark.skipif(
    HAS_EXTENSION and torch.ops.kasmina.cpu_output_cache_limit() < 64 * MIB,
    reason="KASMINA_CPU_OUTPUT_CACHE_BYTES keeps the cache below 64 MiB in this process",
)


def inputs(rows: int, dim: int = 1024, num_chunks: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base, bp, grad = (torch.randn(rows, dim, generator=gen) for _ in range(3))
    alpha = torch.rand(num_chunks, generator=gen)
    alpha[1] = 0.0
    return base, bp, alpha, grad, num_chunks


@pytest.fixture(autouse=True)
def empty_cache():
    gc.collect()  # outputs of earlier tests freed now, not in the middle of this one
    ops.release_cpu_output_cache()
    yield
    ops.release_cpu_output_cache()


@needs_cache
def test_a_freed_output_is_reused_for_the_next_of_its_size() -> None:
    base, bp, alpha, _, s = inputs(512)  # 2 MiB outputs
    out = torch.ops.kasmina.chunked_blend(base, bp, alpha, s)
    address = out.data_ptr()
    assert ops.cpu_output_cache_bytes() == 0
    del out
    held = ops.cpu_output_cache_bytes()
    assert 2 * MIB <= held <= 2 * MIB + 8192  # a header and a page of colour (see below), in whole pages
    again = torch.ops.kasmina.chunked_blend(base, bp, alpha, s)
    assert again.data_ptr() == address and ops.cpu_output_cache_bytes() == 0
    ops.release_cpu_output_cache()  # outputs alive keep their memory
    assert torch.equal(again, _reference.chunked_blend(base, bp, alpha, s))


@needs_cache
def test_new_blocks_start_their_data_at_different_page_offsets() -> None:
    """Blocks made one after the other put their data at least 256 bytes apart modulo a
    page (both ways round): non-temporal stores to two outputs at nearby page offsets, such
    as the backward's grad_base and grad_blueprint_out, were several times slower."""
    base, bp, alpha, grad, s = inputs(384)  # 1.5 MiB outputs, a size no other test uses
    outputs = [torch.ops.kasmina.chunked_blend(base, bp, alpha, s) for _ in range(4)]
    outputs += torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, s, True, True, False)[:2]
    offsets = [out.data_ptr() % 4096 for out in outputs]
    assert all(offset % 256 == 0 for offset in offsets)
    for first, second in itertools.pairwise(offsets):
        assert 256 <= (first - second) % 4096 <= 4096 - 256, offsets
    for out in outputs[:4]:
        assert torch.equal(out, _reference.chunked_blend(base, bp, alpha, s))


def test_small_outputs_bypass_the_cache() -> None:
    base, bp, alpha, _, s = inputs(8)  # 32 KiB
    torch.ops.kasmina.chunked_blend(base, bp, alpha, s)  # freed at once
    assert ops.cpu_output_cache_bytes() == 0


@needs_cache
def test_reused_blocks_never_show_their_old_contents() -> None:
    base, bp, alpha, grad, s = inputs(300, seed=1)
    first = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, s, True, True, True)
    out = torch.ops.kasmina.chunked_blend(base, bp, alpha, s)
    for tensor in (*first[:2], out):
        tensor.fill_(math.nan)
    addresses = {t.data_ptr() for t in (*first[:2], out)}
    del first, out, tensor
    want = _reference.chunked_blend_backward(grad, base, bp, alpha, s)
    grads = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, s, True, True, True)
    out = torch.ops.kasmina.chunked_blend(base, bp, alpha, s)
    assert {t.data_ptr() for t in (*grads[:2], out)} == addresses
    assert torch.equal(out, _reference.chunked_blend(base, bp, alpha, s))
    assert torch.equal(grads[0], want[0]) and torch.equal(grads[1], want[1])
    torch.testing.assert_close(grads[2], want[2], rtol=1e-4, atol=1e-3)


@needs_cache
def test_a_training_loop_cycles_through_a_fixed_set_of_blocks() -> None:
    base, bp, alpha, grad, s = inputs(512, seed=2)
    leaves = [t.clone().requires_grad_(True) for t in (base, bp, alpha)]
    seen: list[set[int]] = []
    for _ in range(6):
        for leaf in leaves:
            leaf.grad = None  # zero_grad(set_to_none=True)
        assert ops.cpu_output_cache_bytes() >= (2 * 2 * MIB if seen else 0)  # the gradients' blocks came back
        out = ops.chunked_blend(*leaves, s)
        out.backward(grad)
        seen.append({out.data_ptr(), leaves[0].grad.data_ptr(), leaves[1].grad.data_ptr()})
        del out
    assert len(set().union(*seen[2:])) <= 3  # after warm-up, no new memory
    want = _reference.chunked_blend_backward(grad, base, bp, alpha, s)
    assert torch.equal(leaves[0].grad, want[0]) and torch.equal(leaves[1].grad, want[1])


def test_cached_outputs_resize_and_lazy_clone_like_any_tensor() -> None:
    base, bp, alpha, _, s = inputs(512, seed=3)
    out = torch.ops.kasmina.chunked_blend(base, bp, alpha, s)
    want = out.clone()
    copy = torch._lazy_clone(out)  # copy-on-write: needs a simple data pointer
    copy.add_(1.0)
    assert torch.equal(out, want) and torch.equal(copy, want + 1.0)
    out.resize_(1024, 1024)  # grows: a new block, the old contents copied
    assert torch.equal(out[:512], want)
    out.resize_(3)
    assert torch.equal(out, want.flatten()[:3])


@needs_cache
def test_threads_share_the_cache_safely() -> None:
    problems = [inputs(256 + 64 * k, seed=k) for k in range(4)]
    wants = [_reference.chunked_blend(b, p, a, s) for b, p, a, _, s in problems]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        base, bp, alpha, grad, s = problems[k]
        try:
            for _ in range(40):
                out = torch.ops.kasmina.chunked_blend(base, bp, alpha, s)
                grads = torch.ops.kasmina.chunked_blend_backward(grad, base, bp, alpha, s, True, True, False)
                assert torch.equal(out, wants[k]) and grads[0].shape == base.shape
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert 0 < ops.cpu_output_cache_bytes() <= torch.ops.kasmina.cpu_output_cache_limit()


# Allocates outputs of 2 MiB and 1 MiB (plus page rounding), frees them, prints what is held.
_LIMIT_CHILD = """
import torch, kasmina
from kasmina import ops
for rows in (512, 256, 512, 256):
    base = torch.randn(rows, 1024)
    torch.ops.kasmina.chunked_blend(base, base, torch.rand(4), 4)  # freed at once
    print(ops.cpu_output_cache_bytes())
print(torch.ops.kasmina.cpu_output_cache_limit())
"""


@pytest.mark.parametrize(("limit", "held"), [(str(3 * MIB), (2, 1, 2, 1)), ("0", (0, 0, 0, 0))])
def test_the_cache_holds_at_most_its_limit_dropping_the_oldest_blocks(limit, held) -> None:
    env = {**os.environ, "KASMINA_CPU_OUTPUT_CACHE_BYTES": limit}
    done = subprocess.run([sys.executable, "-c", _LIMIT_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *bytes_held, reported = (int(line) for line in done.stdout.split())
    assert reported == int(limit)
    # Blocks are two pages larger than the outputs: 2 MiB held; adding 1 MiB passes the limit,
    # so the oldest (the 2 MiB) goes; the next 2 MiB is new and pushes out the 1 MiB; and so on.
    assert [round(b / MIB) for b in bytes_held] == list(held)
    assert all(b <= int(limit) for b in bytes_held)


def test_bad_limits_are_clear_errors() -> None:
    code = "import torch, kasmina; torch.ops.kasmina.cpu_output_cache_limit()"
    for bad in ("-5", "+5", "99999999999999999999"):
        env = {**os.environ, "KASMINA_CPU_OUTPUT_CACHE_BYTES": bad}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert f"KASMINA_CPU_OUTPUT_CACHE_BYTES={bad} is not a byte count" in done.stderr

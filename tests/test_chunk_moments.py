"""kasmina.ops.chunk_moments (the dormant seeds' telemetry): the compiled CPU kernel
against the pure-torch version and against float64 arithmetic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kasmina import _reference, ops
from kasmina._extension import HAS_EXTENSION

needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")


def _exact(values: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """The moments in float64, chunk by chunk."""
    x = values.double()
    parts = x.split(_reference.chunk_widths(x.shape[1], num_chunks), dim=1)
    return torch.stack([torch.stack([p.mean(), (p * p).mean()]) for p in parts], 1)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 200),
    dim=st.integers(1, 300),
    chunks=st.floats(0, 1),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_both_versions_match_float64_arithmetic(rows: int, dim: int, chunks: float, scale: float, seed: int) -> None:
    num_chunks = 1 + int(chunks * (dim - 1))
    values = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * scale + scale / 3
    exact = _exact(values, num_chunks).float()
    for version in (ops.chunk_moments, _reference.chunk_moments):
        moments = version(values, num_chunks)
        # float32 sums of values of size `scale`: absolute error in proportion to it (a mean near 0 has no relative bound)
        torch.testing.assert_close(moments[0], exact[0], rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(moments[1], exact[1], rtol=1e-5, atol=1e-5 * scale * scale)


def test_uneven_chunks_non_contiguous_input_and_no_rows() -> None:
    values = torch.randn(300, 70).t()  # (70, 300), not contiguous; 300 features in 7 chunks: 6 of 43, 1 of 42
    torch.testing.assert_close(ops.chunk_moments(values, 7), _exact(values, 7).float(), rtol=1e-5, atol=1e-6)
    empty = ops.chunk_moments(torch.empty(0, 10), 3)
    assert empty.shape == (2, 3) and empty.isnan().all()
    assert _reference.chunk_moments(torch.empty(0, 10), 3).isnan().all()


@needs_extension
def test_the_kernel_does_not_depend_on_the_thread_count() -> None:
    values = torch.randn(1000, 1024, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.chunk_moments(values, 64)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(ops.chunk_moments(values, 64), one)
    finally:
        torch.set_num_threads(threads)


@needs_extension
def test_opcheck() -> None:
    values = torch.randn(65, 33)
    torch.library.opcheck(torch.ops.kasmina.chunk_moments.default, (values, 5))


@pytest.mark.parametrize(
    ("values", "num_chunks", "error", "match"),
    [
        (torch.zeros(4), 2, ValueError, r"values must be \(rows, dim\), got shape \(4,\)"),
        (torch.zeros(4, 8, dtype=torch.float64), 2, TypeError, "values must be float32, got torch.float64"),
        (torch.zeros(4, 8), 9, ValueError, r"num_chunks must be an int in \[1, 8\], got 9"),
        (torch.zeros(4, 8), 0, ValueError, r"got 0"),
        (torch.zeros(4, 8), True, ValueError, r"got True"),
    ],
)
def test_bad_input_is_refused_with_the_bad_value_named(values, num_chunks, error, match) -> None:
    with pytest.raises(error, match=match):
        ops.chunk_moments(values, num_chunks)

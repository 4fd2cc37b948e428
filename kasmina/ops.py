"""The only door to the kernels.

Each public function here dispatches to ``torch.ops.kasmina.*`` when the compiled
extension is loaded and to the pure-torch versions in :mod:`kasmina._reference`
otherwise (``kasmina.backend()`` says which). Fake (meta) kernels and autograd
formulas for the compiled ops are registered here, so the ops work under
``torch.compile(fullgraph=True)`` and in training.
"""

from __future__ import annotations

import torch

from . import _reference
from ._extension import HAS_CUDA_KERNELS, HAS_EXTENSION
from ._generated.lifecycle_tables import NUM_STATES as _NUM_STATES

__all__ = ["HAS_EXTENSION", "compiled_serves"]


def compiled_serves(tensor: torch.Tensor) -> bool:
    """Whether the compiled ops serve tensors on ``tensor``'s device (else the reference)."""
    # Tensor flags rather than tensor.device.type: building the device object costs ~1 µs a call.
    return HAS_EXTENSION and (tensor.is_cpu or tensor.is_meta or (HAS_CUDA_KERNELS and tensor.is_cuda))


# ---- lifecycle ops ----------------------------------------------------------------

__all__ += ["apply_transitions", "state_summary", "step_epoch"]


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
    """Judge K transition requests and commit the accepted ones in place.

    ``state`` (N, 8) int32, ``history`` (N, H, 2) int32 and ``history_count`` (N,) int32
    are mutated; ``seed_ids`` int64 (K,), ``from_states``/``to_states`` both int32 or both
    int64 (K,), ``context`` float32 (K, F) with NaN for missing metrics, ``min_epochs``
    int32 (S,) and ``params`` float32 (P,) (see ``LifecyclePolicy.tensors``). Returns
    int32 (K,) reason codes (``kasmina.Reason``). Inputs are expected validated
    (``ExtendedStateTensor.apply_transitions`` does that); the kernels check shapes and
    dtypes only.
    """
    impl = torch.ops.kasmina.apply_transitions if compiled_serves(state) else _reference.apply_transitions
    return impl(state, history, history_count, seed_ids, from_states, to_states, context, min_epochs, params)


def step_epoch(state: torch.Tensor) -> None:
    """Advance every seed's EPOCHS_IN_STATE by one lifecycle epoch, saturating, in place."""
    if compiled_serves(state):
        torch.ops.kasmina.step_epoch(state)
    else:
        _reference.step_epoch(state)


def state_summary(state: torch.Tensor) -> torch.Tensor:
    """Number of seeds in each state id, int64 (NUM_STATES,)."""
    if compiled_serves(state):
        return torch.ops.kasmina.state_summary(state)
    return _reference.state_summary(state)


if HAS_EXTENSION:

    @torch.library.register_fake("kasmina::apply_transitions")
    def _apply_transitions_fake(state, history, history_count, seed_ids, from_states, to_states, context,
                                min_epochs, params):
        return seed_ids.new_empty(seed_ids.shape, dtype=torch.int32)

    @torch.library.register_fake("kasmina::step_epoch")
    def _step_epoch_fake(state):
        return None

    @torch.library.register_fake("kasmina::state_summary")
    def _state_summary_fake(state):
        return state.new_empty((_NUM_STATES,), dtype=torch.int64)


# ---- chunked blend ----------------------------------------------------------------

__all__ += ["chunked_blend"]


def chunked_blend(base: torch.Tensor, blueprint_out: torch.Tensor, alpha: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Blend a blueprint's output into the host's, chunk by chunk.

    ``base`` and ``blueprint_out`` are (..., D) tensors of one dtype (float32, float16,
    bfloat16 or float64) on one device; ``alpha`` is (num_chunks,) float32 (or float64
    with float64 inputs). Chunk ``s`` is a contiguous slice of the last dimension, the
    first ``D % num_chunks`` chunks one feature wider. Returns
    ``base + alpha[chunk] * (blueprint_out - base)``, computed in float32 (float64 for
    float64 inputs). A chunk whose alpha is exactly 0 returns ``base`` and never reads
    ``blueprint_out`` (it may hold NaN there); it passes no gradient to ``blueprint_out``
    or ``alpha``. Differentiable in all three tensors, twice too (a backward with
    ``create_graph=True`` computes the gradients in differentiable torch ops), and usable under
    ``torch.compile(fullgraph=True)``. Raises ValueError/TypeError for mismatched shapes,
    devices or dtypes, a wrong alpha length, or ``num_chunks`` outside ``[1, D]``.

    On CPU, float32 and float64 calls take AVX2 row loops where the machine has AVX2
    (``KASMINA_CPU_AVX2_ROWS=0`` turns them off). A call writes its outputs with non-temporal
    stores (past the cache) when it moves more bytes than the last-level cache holds, or when
    its output memory was last written by a blend call more than half that many bytes of
    blend traffic ago; ``KASMINA_STREAM_MIN_BYTES`` sets the size and ``kasmina info`` shows
    both settings. CPU outputs of 1 MiB or more (of this call and of its backward) reuse the
    memory of earlier freed ones; see :func:`cpu_output_cache_bytes`.
    """
    _reference.check_num_chunks_type(num_chunks)
    if not compiled_serves(base):
        return _reference.chunked_blend(base, blueprint_out, alpha, num_chunks)
    if torch.compiler.is_compiling():  # traced code keeps the plain op and its registered autograd
        return _BLEND_OP(base, blueprint_out, alpha, num_chunks)
    # Eager calls skip the Python autograd kernel that register_autograd installs (its
    # trampoline and redispatch cost tens of µs a call): with something to differentiate
    # they apply the same formula through _ChunkedBlendFunction, without they call the kernel.
    if torch.is_grad_enabled() and torch._C._any_requires_grad(base, blueprint_out, alpha):
        return _ChunkedBlendFunction.apply(base, blueprint_out, alpha, num_chunks)
    with torch._C._AutoDispatchBelowAutograd():
        return _BLEND_OP(base, blueprint_out, alpha, num_chunks)


if HAS_EXTENSION:
    _BLEND_OP = torch.ops.kasmina.chunked_blend.default
    _BLEND_BACKWARD_OP = torch.ops.kasmina.chunked_blend_backward.default

    @torch.library.register_fake("kasmina::chunked_blend")
    def _chunked_blend_fake(base, blueprint_out, alpha, num_chunks):
        _reference.check_blend_args(base, blueprint_out, alpha, num_chunks)
        return torch.empty_like(base, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kasmina::chunked_blend_backward")
    def _chunked_blend_backward_fake(grad, base, blueprint_out, alpha, num_chunks, need_base, need_blueprint,
                                     need_alpha):
        _reference.check_blend_args(base, blueprint_out, alpha, num_chunks, "chunked_blend_backward")

        def full(needed: bool) -> torch.Tensor:
            return base.new_empty(base.shape) if needed else base.new_empty((0,))

        grad_alpha = alpha.new_empty((num_chunks if need_alpha else 0,))
        return full(need_base), full(need_blueprint), grad_alpha

    def _chunked_blend_setup_context(ctx, inputs, output) -> None:
        base, blueprint_out, alpha, num_chunks = inputs
        ctx.save_for_backward(base, blueprint_out, alpha)
        ctx.num_chunks = num_chunks

    def _chunked_blend_backward(ctx, grad):
        base, blueprint_out, alpha = ctx.saved_tensors
        need_base, need_blueprint, need_alpha = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # backward(create_graph=True): the gradients get differentiated in turn
            grad_base, grad_blueprint, grad_alpha = _reference.chunked_blend_backward(
                grad, base, blueprint_out, alpha, ctx.num_chunks
            )
        else:
            grad_base, grad_blueprint, grad_alpha = _BLEND_BACKWARD_OP(
                grad, base, blueprint_out, alpha, ctx.num_chunks, need_base, need_blueprint, need_alpha
            )
        return (
            grad_base if need_base else None,
            grad_blueprint if need_blueprint else None,
            grad_alpha if need_alpha else None,
            None,
        )

    torch.library.register_autograd(
        "kasmina::chunked_blend", _chunked_blend_backward, setup_context=_chunked_blend_setup_context
    )

    class _ChunkedBlendFunction(torch.autograd.Function):
        """The registered autograd formula of kasmina::chunked_blend, applied directly by
        eager calls of :func:`chunked_blend`. The context is set up inside forward: a
        separate setup_context would make every apply() bind its arguments with inspect."""

        @staticmethod
        def forward(ctx, base, blueprint_out, alpha, num_chunks):
            with torch._C._AutoDispatchBelowAutograd():
                out = _BLEND_OP(base, blueprint_out, alpha, num_chunks)
            _chunked_blend_setup_context(ctx, (base, blueprint_out, alpha, num_chunks), out)
            return out

        backward = staticmethod(_chunked_blend_backward)


__all__ += ["cpu_output_cache_bytes", "release_cpu_output_cache"]


def cpu_output_cache_bytes() -> int:
    """Bytes of freed CPU :func:`chunked_blend` outputs (forward and backward) that kasmina
    holds for reuse; 0 without the compiled extension.

    Outputs of 1 MiB or more come from blocks earlier outputs were freed from: glibc
    otherwise hands freed memory back to the kernel when a backward's two gradients are
    freed together, and faulting their pages in again costs more than the blend itself.
    The cache holds at most ``KASMINA_CPU_OUTPUT_CACHE_BYTES`` (default 256 MiB; 0 turns it
    off), dropping its oldest blocks past that; ``kasmina info`` shows the limit.
    """
    return int(torch.ops.kasmina.cpu_output_cache_bytes()) if HAS_EXTENSION else 0


def release_cpu_output_cache() -> None:
    """Free every block of :func:`cpu_output_cache_bytes` (outputs still alive keep theirs)."""
    if HAS_EXTENSION:
        torch.ops.kasmina.release_cpu_output_cache()


# ---- telemetry --------------------------------------------------------------------

__all__ += ["chunk_moments"]


def chunk_moments(values: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """(2, num_chunks) float32: the mean of ``values`` and of its square over every row
    and every feature of each chunk of a (rows, dim) float32 tensor, chunks as in
    :func:`chunked_blend`; NaN when there are no rows. One pass on CPU (the compiled
    kernel); other devices use the pure-torch version."""
    if values.dim() != 2:
        raise ValueError(f"chunk_moments: values must be (rows, dim), got shape {tuple(values.shape)}")
    if values.dtype != torch.float32:
        raise TypeError(f"chunk_moments: values must be float32, got {values.dtype}")
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or not 1 <= num_chunks <= values.shape[1]:
        raise ValueError(f"chunk_moments: num_chunks must be an int in [1, {values.shape[1]}], got {num_chunks!r}")
    if HAS_EXTENSION and (values.is_cpu or values.is_meta):
        return _CHUNK_MOMENTS_OP(values, num_chunks)
    return _reference.chunk_moments(values, num_chunks)


if HAS_EXTENSION:
    _CHUNK_MOMENTS_OP = torch.ops.kasmina.chunk_moments.default

    @torch.library.register_fake("kasmina::chunk_moments")
    def _chunk_moments_fake(values, num_chunks):
        return values.new_empty((2, num_chunks))

"""Pure-torch versions of every kasmina op: the fallback when the extension is absent
and the oracle the compiled kernels are tested against. Results are identical to the
kernels' (same float32 comparisons, same reason codes)."""

from __future__ import annotations

# ---- lifecycle ops ----------------------------------------------------------------

# ---- chunked blend ----------------------------------------------------------------

"""The only door to the kernels.

Each public function here dispatches to ``torch.ops.kasmina.*`` when the compiled
extension is loaded and to the pure-torch versions in :mod:`kasmina._reference`
otherwise (``kasmina.backend()`` says which). Fake (meta) kernels and autograd
formulas for the compiled ops are registered here, so the ops work under
``torch.compile(fullgraph=True)`` and in training.
"""

from __future__ import annotations

from ._extension import HAS_EXTENSION

__all__ = ["HAS_EXTENSION"]

# ---- lifecycle ops ----------------------------------------------------------------

# ---- chunked blend ----------------------------------------------------------------

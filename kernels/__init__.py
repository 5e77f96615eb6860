"""Triton kernels of fused-canon (installed as ``fused_canon.kernels``).

A leaf package: it imports torch, triton and itself, nothing else of fused_canon. Each module holds
kernels, their launchers and the autograd.Function around them (Liger-Kernel's layout); launchers
take tensors and scalars. Reading a LossConfig / AdvantageConfig into a launch is the business of
fused_canon (next to the torch reference each kernel reproduces), and fused_canon/backends.py
decides which implementation runs.

  softmax.py             @triton.jit helpers both statistics paths share: a tile's softmax summary,
                         merging summaries, a row's statistics, the gradient tile
  logits_token_stats.py  log-prob and entropy of the target from logits [B, T, V], and dlogits
  linear_token_stats.py  the same from hidden states and the LM head, never forming [N, V]
  advantages.py          the built-in outcome estimators, one program per prompt group
  objective.py           the per-token policy objective, aggregation and metric sums
  logits_policy_loss.py  statistics, objective and dlogits in one pass when the coefficients are known first

This file also holds the one check both statistics backends make before writing dlogits in place.

This file imports no triton at module level, so ``triton_available`` and
``triton_interpreter_enabled`` work without it.
"""

import os


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET`` as Triton itself reads
    it (its knobs accept 1/true/yes/on), or any value but "" and "0" on a Triton without knobs."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def elements_overlap(x) -> bool:
    """Whether two elements of ``x`` may share memory (a stride-0 dimension from expand(), or an as_strided
    view whose rows interleave): sorted by stride, each dimension must step past the whole extent of the
    smaller ones. Slices and permutations of a tensor pass; a few exotic non-overlapping layouts do not."""
    if x.numel() == 0:
        return False
    extent = 0  # the largest offset reachable through the dimensions seen so far
    for stride, size in sorted((stride, size) for size, stride in zip(x.shape, x.stride()) if size > 1):
        if stride <= extent:
            return True
        extent += stride * (size - 1)
    return False


def check_inplace_gradient_target(logits) -> None:
    """``inplace_backward`` writes dlogits over ``logits``: refused when its elements share memory (one slot
    cannot hold the gradients of several logits). Both statistics backends call it in their forward."""
    if elements_overlap(logits):
        raise ValueError(f"inplace_backward=True writes dlogits over the logits, but these logits (shape "
                         f"{tuple(logits.shape)}, strides {tuple(logits.stride())}) share memory between elements, "
                         "e.g. an expand(): their gradient needs its own memory. Pass inplace_backward=False, "
                         "or materialise them with .contiguous()")


def _patch_triton36_interpreter_for_numpy24():
    """Triton 3.6's CPU interpreter turns scalars into ints with ``int(ndarray of shape (1,))``,
    which numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"):
    every kernel with a runtime-bounded ``range()`` loop fails. Triton 3.7 squeezes first; do the
    same on 3.6 (the GPU machine pairs triton 3.6.0 with numpy 2.5). Interpreter only, no-op
    elsewhere."""
    if not triton_interpreter_enabled():
        return
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if not triton.__version__.startswith("3.6.") or original is None or getattr(original, "_fused_canon", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._fused_canon = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


_patch_triton36_interpreter_for_numpy24()

"""Triton kernels of fused-canon (installed as ``fused_canon.kernels``)."""

from fused_canon.token_stats import triton_interpreter_enabled


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

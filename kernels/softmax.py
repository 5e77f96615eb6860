"""Softmax statistics and their gradient, shared by both Triton statistics paths
(logits_token_stats.py, linear_token_stats.py, logits_policy_loss.py): one formulation, the precise
one, for all.

A *summary* of a set of tempered logits z_k is (m, rest, u):

    m    = max_k z_k
    rest = sum_k exp(z_k - m) - 1          the sum-exp without one maximal element (which is exactly 1)
    u    = sum_k exp(z_k - m) (z_k - m)    (<= 0)

Summaries of tiles merge (``merge_summaries``), so a row is read once, tile by tile (the same for
sum_k exp(2 (z_k - m)), whence sum_k p_k^2: ``merge_sums_of_squares``). From a row's
summary and its target logit z_y, with s = 1 + rest (docs/algorithms.md §8.1):

    lse  = m + log1p(rest)          logp = (z_y - m) - log1p(rest)
    H    = log1p(rest) - u / s      (two non-negative terms: no cancellation of lse - zbar)
    zbar = m + u / s                (= sum_k p_k z_k)

Keeping the 1 out of ``rest`` and taking log1p keeps the relative precision of a peaked row: with
a logit gap of 30, rest ~ 1e-13 and log(1 + rest) would round to 0 in fp32, and logp and H with it.

Gradient (§8.3), with c_logp = dL/dlogp, c_ent = dL/dH and p_k = exp(z_k - lse):

    dL/dz_k = -p_k [c_logp + c_ent (z_k - zbar)]          k != y
    dL/dz_y = c_logp (1 - p_y) - c_ent p_y (z_y - zbar)

The target column (``target_grad``, once per row) is formed from the row's own results,
1 - p_y = -expm1(logp) and z_y - zbar = logp + H, so a peaked row keeps its relative precision there
too (1 - exp(z_y - lse) and z_y - zbar from the tile would cancel to ~ulp); ``softmax_grad`` writes
the tile, ``store_row_grad`` a whole row of [*, V] logits (``store_zero_row`` a masked one).

Entries equal to -inf (a masked vocabulary, the padded columns of a tile) contribute nothing; a tile
of only -inf entries summarises to m = -inf, the empty summary, whose rest and u are never read. No
libdevice: it does not run in Triton's interpreter.
"""

import triton
import triton.language as tl


@triton.jit
def log1p(x):
    """log(1 + x) to full relative precision for tiny x >= 0: the rounding error of 1 + x is
    divided back out (Goldberg, "What every computer scientist...", Theorem 4)."""
    one_plus_x = 1.0 + x
    rounded_x = one_plus_x - 1.0
    safe_rounded_x = tl.where(rounded_x == 0.0, 1.0, rounded_x)
    return tl.where(rounded_x == 0.0, x, tl.log(one_plus_x) * (x / safe_rounded_x))


@triton.jit
def one_minus_exp(x):
    """1 - exp(x) = -expm1(x) for x <= 0, exact near 0 (Kahan's expm1 trick: (e - 1) x / log(e)
    divides the rounding error of e = exp(x) back out)."""
    e = tl.exp(x)
    e_minus_one = e - 1.0
    use_x = e == 1.0  # |x| below half an ulp of 1: expm1(x) = x
    use_minus_one = e_minus_one == -1.0  # exp(x) negligible next to 1
    safe_log_e = tl.log(tl.where(use_x | use_minus_one, 2.0, e))  # no log(0) or 0 / 0 on unused lanes
    expm1 = tl.where(use_x, x, tl.where(use_minus_one, -1.0, e_minus_one * (x / safe_log_e)))
    return -expm1


@triton.jit
def tile_summary(z, live, AXIS: tl.constexpr, MAY_BE_EMPTY: tl.constexpr):
    """The summary (m, rest, u) of the entries of ``z`` along ``AXIS``, and exp(z - m) (for further sums:
    sum_k p_k^2). ``live`` (broadcasting against ``z``) marks the entries that are not -inf; the others
    count for nothing. ``MAY_BE_EMPTY``: a tile may hold only -inf entries (a masked vocabulary), so m
    may be -inf; the LM-head path without a bias (finite logits) skips that guard."""
    m = tl.max(z, axis=AXIS)
    if MAY_BE_EMPTY:
        m_ref = tl.expand_dims(tl.where(m > float("-inf"), m, 0.0), AXIS)  # no -inf - -inf
    else:
        m_ref = tl.expand_dims(m, AXIS)
    shifted = z - m_ref  # <= 0; -inf on -inf entries
    e = tl.exp(shifted)  # 0 on -inf entries
    is_max = shifted == 0.0
    n_max = tl.sum(is_max.to(tl.float32), axis=AXIS)
    # Ties of the maximum: every copy but one adds its exact 1. (A tile of only -inf entries gets
    # rest = -1, its sum-exp 0 minus 1: merging never reads an empty side's rest.)
    rest = tl.sum(tl.where(is_max, 0.0, e), axis=AXIS) + (n_max - 1.0)
    u = tl.sum(e * tl.where(live, shifted, 0.0), axis=AXIS)  # no 0 * -inf
    return m, rest, u, e


@triton.jit
def merge_summaries(m_a, rest_a, u_a, m_b, rest_b, u_b):
    """The summary of the union of two sets from their summaries. The side with the smaller max is
    rescaled by exp(-d), d = difference of the maxima: its whole sum-exp (1 + rest) moves into the
    merged ``rest`` and its u shifts by -d (1 + rest). Either side may be empty (max -inf): its rest and
    u are not read then."""
    a_is_larger = m_a > m_b
    m = tl.maximum(m_a, m_b)
    m_small = tl.where(a_is_larger, m_b, m_a)
    rest_large = tl.where(a_is_larger, rest_a, rest_b)
    u_large = tl.where(a_is_larger, u_a, u_b)
    rest_small = tl.where(a_is_larger, rest_b, rest_a)
    u_small = tl.where(a_is_larger, u_b, u_a)
    small_is_empty = m_small == float("-inf")
    # d >= 0, and 0 for an empty side (never -inf - -inf, not even on a lane that is thrown away).
    shift = tl.where(small_is_empty, 0.0, m - tl.where(small_is_empty, 0.0, m_small))
    scale = tl.where(small_is_empty, 0.0, tl.exp(-shift))
    sum_exp_small = 1.0 + rest_small
    rest = rest_large + scale * sum_exp_small
    u = u_large + scale * (u_small - shift * sum_exp_small)
    return m, rest, u


@triton.jit
def row_statistics(m, rest, u, z_target):
    """(logp, entropy, lse, zbar) of a row from its summary and its tempered target logit."""
    log_sum_exp_shifted = log1p(rest)
    u_over_s = u / (1.0 + rest)
    logp = (z_target - m) - log_sum_exp_shifted
    entropy = log_sum_exp_shifted - u_over_s
    return logp, entropy, m + log_sum_exp_shifted, m + u_over_s


@triton.jit
def merge_sums_of_squares(squares, m_before, tile_squares, tile_m, m, MAY_BE_EMPTY: tl.constexpr):
    """sum_k exp(2 (z_k - m)) of the row so far, relative to its merged max ``m``, from the previous sum
    (relative to ``m_before``) and the tile's (relative to ``tile_m``); exp(2 (m_before - m)) is 0 while
    m_before is -inf (the previous sum is 0 then too). ``MAY_BE_EMPTY`` as in ``tile_summary``."""
    if MAY_BE_EMPTY:
        m = tl.where(m > float("-inf"), m, 0.0)  # a row of only -inf entries so far: no -inf - -inf
    return squares * tl.exp(2.0 * (m_before - m)) + tile_squares * tl.exp(2.0 * (tile_m - m))


@triton.jit
def sum_of_squared_probs(squares, rest):
    """sum_k p_k^2 of a row from its sum_k exp(2 (z_k - m)) and its summary's rest: squares / s^2."""
    return squares / ((1.0 + rest) * (1.0 + rest))


@triton.jit
def target_grad(logp, entropy, c_logp, c_ent, MAY_HOLD_NEG_INF: tl.constexpr):
    """dL/dz_y of each row, c_logp (1 - p_y) - c_ent p_y (z_y - zbar), from the row's own results:
    1 - p_y = -expm1(logp), z_y - zbar = logp + H (per-row values: scalars or vectors).
    ``MAY_HOLD_NEG_INF``: the logits may be -inf (a masked vocabulary), so logp may be -inf; p_y = 0
    then contributes exactly 0 (the LM-head path without a bias has finite logits and skips the guard)."""
    p_target = tl.exp(logp)
    entropy_term = c_ent * p_target * (logp + entropy)
    if MAY_HOLD_NEG_INF:
        entropy_term = tl.where(p_target > 0.0, entropy_term, 0.0)  # never 0 * inf
    return c_logp * one_minus_exp(logp) - entropy_term


@triton.jit
def softmax_grad(z, is_target, lse, zbar, c_logp, c_ent, grad_target, MAY_HOLD_NEG_INF: tl.constexpr):
    """dL/dz of a tile of tempered logits ``z``: -p_k [c_logp + c_ent (z_k - zbar)] off the target,
    ``grad_target`` (``target_grad``) in the column ``is_target`` marks. The per-row values broadcast
    against ``z``. p = exp(z - lse) is exactly 0 for z = -inf, and then contributes exactly 0."""
    p = tl.exp(z - lse)
    centred = z - zbar
    if MAY_HOLD_NEG_INF:
        centred = tl.where(z > float("-inf"), centred, 0.0)  # never 0 * inf
    return tl.where(is_target, grad_target, -p * (c_logp + c_ent * centred))


@triton.jit
def store_row_grad(x_row, d_row, y, V, inv_temp, lse, zbar, logp, entropy, c_logp, c_ent, BLOCK_V: tl.constexpr):
    """dL/dlogits of one row of [*, V] logits at ``x_row`` (tempered by ``inv_temp``) into ``d_row``, from the
    row's statistics and coefficients. Each tile is read before it is written, by the calling program
    only: safe in place (``d_row == x_row``)."""
    grad_target = target_grad(logp, entropy, c_logp, c_ent, MAY_HOLD_NEG_INF=True)  # once per row
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        live = offs < V
        z = tl.load(x_row + offs, mask=live, other=float("-inf")).to(tl.float32) * inv_temp
        g = softmax_grad(z, offs == y, lse, zbar, c_logp, c_ent, grad_target, MAY_HOLD_NEG_INF=True) * inv_temp
        tl.store(d_row + offs, g.to(d_row.dtype.element_ty), mask=live)


@triton.jit
def store_zero_row(d_row, V, BLOCK_V: tl.constexpr):
    """A zero gradient for a masked row (its logits are not read)."""
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        tl.store(d_row + offs, tl.zeros([BLOCK_V], dtype=d_row.dtype.element_ty), mask=offs < V)

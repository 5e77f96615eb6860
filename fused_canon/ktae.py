"""KTAE, key-token advantage estimation (docs/algorithms.md §6): GRPO plus a per-token value from token-id
statistics of each prompt group. No logits: it reads the sampled token ids and the rewards only.

For each group with correct (r > 0) and wrong responses, and each token id v seen at a valid position:
  a, b  = correct / wrong responses containing v;  c = n_correct - a,  d = n_wrong - b
  F     = exp(-2 p) with p the two-sided Fisher exact p-value of [[a, b], [c, d]], and F = 0 when p == 1
  IG    = H(Y) - H(Y | v present), in bits
  x     = Cohen's h of a/(a+c) against b/(b+d), plus the BM25 term-frequency ratio terms
  KT(v) = 2 top (sigmoid((alpha F + beta IG) x / (alpha + beta)) - 1/2),  0 for ktae_ignore_token_ids
and the advantage of a valid token y is GRPO(r) + KT(y). A group with one side only gets KT = 0.

Decisions where upstream (xiaolizh1/KTAE@ea9fb77) is inconsistent (docs/algorithms.md §9.8):
  * The p-value is summed and compared with 1 in exact rational arithmetic: the hypergeometric
    probabilities of a 2x2 table are ratios of integers. Upstream sums floats and tests ``p != 1.0``,
    which misses most tables whose exact p is 1 (then F = e^-2 instead of 0). Its ``P(k) <= P(a)`` has
    no tolerance either; here it is exact too.
  * The statistics are per (group, token) pair over the valid positions only, so no table is sized by
    the batch's largest id: no IndexError for a singleton holding that id, nor for batches whose ids stay
    below Qwen's 151643 (upstream forces KT[151643] = 0 by index). The ignored ids are a config field
    (empty by default); they still count in the response lengths, as upstream.
  * norm_by_std and baseline apply to the GRPO part as in ``grpo`` (upstream always normalises).
  * A side whose responses have no valid token has term frequency 0 (upstream: 0/0).
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from math import comb, exp

import torch

from .estimators import grpo, register_estimator

__all__ = ["fisher_exact_p", "fisher_score", "key_token_values"]


def fisher_exact_p(a: int, b: int, c: int, d: int) -> Fraction:
    """Two-sided Fisher exact p-value of the table [[a, b], [c, d]], exactly: the sum of the
    hypergeometric probabilities P(k) = C(C1, k) C(n - C1, R1 - k) / C(n, R1) that are <= P(a)."""
    n, row1, col1 = a + b + c + d, a + b, a + c
    weights = [comb(col1, k) * comb(n - col1, row1 - k) for k in range(max(0, row1 + col1 - n), min(row1, col1) + 1)]
    observed = comb(col1, a) * comb(n - col1, row1 - a)
    return Fraction(sum(w for w in weights if w <= observed), comb(n, row1))


@lru_cache(maxsize=65536)
def fisher_score(a: int, b: int, c: int, d: int) -> float:
    """KTAE's association score F = exp(-2 p), and 0 when p == 1 exactly."""
    p = fisher_exact_p(a, b, c, d)
    return 0.0 if p == 1 else exp(-2.0 * float(p))


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """-p log2 p, with 0 log 0 = 0."""
    return torch.where(p > 0, -p * torch.log2(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))


def _split_entropy(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of the split (x1, x2) of a count, 0 for an empty one."""
    total = x1 + x2
    safe = total.clamp(min=1)
    return torch.where(total > 0, _entropy_bits(x1 / safe) + _entropy_bits(x2 / safe), torch.zeros_like(total))


def _bm25_tf(frequency: torch.Tensor, side_length: torch.Tensor, mean_length: torch.Tensor, k1: float, b: float):
    """BM25 term-frequency saturation f (k1 + 1) / (f + k1 (1 - b + b L / avg))."""
    return frequency * (k1 + 1) / (frequency + k1 * (1 - b + b * side_length / mean_length))


def key_token_values(a, b, n_correct, n_wrong, count_correct, count_wrong, length_correct, length_wrong, config):
    """KT of each (group, token) pair from its counts (float tensors [P]): a/b responses containing the
    token on each side, n_correct/n_wrong responses per side, count_* the token's occurrences and
    length_* the valid tokens on each side."""
    c, d = n_correct - a, n_wrong - b
    n = n_correct + n_wrong
    tables = torch.stack([a, b, c, d], 1).round().long().tolist()
    fisher = torch.tensor([fisher_score(*table) for table in tables], dtype=a.dtype, device=a.device)
    information_gain = (_split_entropy(n_correct, n_wrong)
                        - ((a + b) / n) * _split_entropy(a, b) - ((c + d) / n) * _split_entropy(c, d))
    cohen_h = (torch.asin(torch.sqrt((a / (a + c + 1e-10)).clamp(0, 1)))
               - torch.asin(torch.sqrt((b / (b + d + 1e-10)).clamp(0, 1))))
    mean_length = (length_correct + length_wrong) / 2
    tf_correct = _bm25_tf(torch.where(length_correct > 0, count_correct / length_correct.clamp(min=1), 0.0),
                          length_correct, mean_length, config.ktae_k1, config.ktae_b)
    tf_wrong = _bm25_tf(torch.where(length_wrong > 0, count_wrong / length_wrong.clamp(min=1), 0.0),
                        length_wrong, mean_length, config.ktae_k1, config.ktae_b)
    direction = cohen_h + tf_correct / (tf_wrong + 1e-5) - tf_wrong / (tf_correct + 1e-5)
    score = (config.ktae_alpha * fisher + config.ktae_beta * information_gain) * direction
    return (torch.sigmoid(score / (config.ktae_alpha + config.ktae_beta)) - 0.5) * 2 * config.ktae_top


@register_estimator("ktae", inputs=("mask", "token_ids"))
def ktae(rewards, groups, config, *, mask, token_ids, metric=None, step=0):
    """GRPO + KT(token) on every valid token, whatever the response's correctness (additive), [B, T]."""
    dtype = rewards.dtype
    rows, cols = (mask > 0).nonzero(as_tuple=True)
    tokens = token_ids[rows, cols].long()
    correct = rewards > 0
    # One entry per (group, token id) seen at a valid position.
    pairs, pair = torch.unique(torch.stack([groups.index[rows], tokens], 1), dim=0, return_inverse=True)
    num_pairs = len(pairs)
    pair_group = pairs[:, 0]
    zeros = torch.zeros(num_pairs, dtype=dtype, device=rewards.device)
    on_correct = correct[rows].to(dtype)
    count_correct = zeros.index_add(0, pair, on_correct)
    count_wrong = zeros.index_add(0, pair, 1 - on_correct)
    # Responses containing the token: distinct (row, pair) entries.
    row_pair = torch.unique(rows * num_pairs + pair)
    present_row, present_pair = row_pair // num_pairs, row_pair % num_pairs
    present_correct = correct[present_row].to(dtype)
    a = zeros.index_add(0, present_pair, present_correct)
    b = zeros.index_add(0, present_pair, 1 - present_correct)

    n_correct = groups.sum(correct.to(dtype))
    n_wrong = groups.count.to(dtype) - n_correct
    lengths = mask.sum(-1)
    length_correct = groups.sum(lengths * correct)
    length_wrong = groups.sum(lengths * ~correct)
    values = key_token_values(a, b, n_correct[pair_group], n_wrong[pair_group], count_correct, count_wrong,
                              length_correct[pair_group], length_wrong[pair_group], config)
    both_sides = (n_correct > 0) & (n_wrong > 0)
    ignored = torch.isin(pairs[:, 1], torch.tensor(config.ktae_ignore_token_ids, dtype=torch.long,
                                                   device=rewards.device))
    values = torch.where(both_sides[pair_group] & ~ignored, values, torch.zeros_like(values))

    key_tokens = torch.zeros_like(mask)
    key_tokens[rows, cols] = values[pair]
    return grpo(rewards, groups, config)[:, None] * mask + key_tokens

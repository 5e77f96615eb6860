"""fused-canon against TRL 1.16's own loss, ``GRPOTrainer._compute_loss``, run unbound on a stand-in for the
trainer that carries only the attributes the loss reads (one process, no gradient accumulation, no model:
its log-probs are the test's), on the grid of grpo_mapping: every loss_type at both importance-sampling
levels, ``delta``, the KL with and without ``use_bias_correction_kl``, the vLLM IS ratio (token and
sequence, truncate), both objective backends: loss, gradient w.r.t. the log-probs and TRL's logged metrics
(docs/integrations.md's TRL / Liger table)."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from peers import compared, require
from peers.grpo_mapping import (B, EPS_HIGH, EPS_LOW, KL, LOSS_TYPES, T, assert_ours_matches, batch, our_config,
                                peer_is_ratio, rollout_weights, skip_inapplicable, skip_unsupported_backend)

require("trl")
from trl import GRPOTrainer  # noqa: E402

PEER = "TRL 1.16"


class OneProcess:
    """The accelerator calls of ``_compute_loss`` on one process."""
    num_processes = 1
    sync_gradients = True

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def trl_loss(logp, old, ref, adv, mask, *, loss_type, level, delta, beta, bias_kl, is_ratio):
    """TRL's loss and logged metrics for the log-probs ``logp`` (a leaf the gradient flows into)."""
    args = SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta, sapo_temperature_pos=1.0,
                           sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                           vespo_lambda_neg=2.0, steps_per_generation=1)
    metrics = {"train": defaultdict(list)}
    trainer = SimpleNamespace(
        args=args, beta=beta, loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
        importance_sampling_level=level, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=True, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=OneProcess(), max_completion_length=T,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=metrics,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, torch.ones_like(logp), None))
    valid = mask.float()
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": valid,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": valid.sum()}
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return GRPOTrainer._compute_loss(trainer, None, inputs), {k: v[-1] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rollout", [None, "token", "sequence"], ids=lambda r: f"is-{r}")
@pytest.mark.parametrize("beta, bias_kl", KL, ids=lambda x: str(x))
@pytest.mark.parametrize("delta", [None, 1.5], ids=lambda d: f"delta-{d}")
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_compute_loss(request, loss_type, level, delta, beta, bias_kl, rollout, backend):
    skip_inapplicable(loss_type, level, delta)
    if loss_type == "vespo" and rollout == "sequence":
        pytest.skip("TRL refuses vespo with a sequence-level vLLM IS mode (compared against Liger)")
    config, norm = our_config(loss_type, level, delta, beta, bias_kl, rollout)
    skip_unsupported_backend(request, PEER, config, backend)
    compared(request, PEER)
    logp, old, ref, rollout_logp, adv, mask = batch(seed=7)
    weights = rollout_weights(old, rollout_logp, mask, config, rollout)

    theirs_logp = logp.clone().requires_grad_(True)
    theirs, their_metrics = trl_loss(theirs_logp, old, ref, adv, mask, loss_type=loss_type, level=level,
                                     delta=delta, beta=beta, bias_kl=bias_kl,
                                     is_ratio=peer_is_ratio(weights, mask, rollout))
    theirs.backward()

    out = assert_ours_matches(theirs, theirs_logp, logp, old, ref, adv, mask, weights, beta, config, backend, norm)
    clip_metric = {"cispo": "cispo_clip_ratio"}.get(loss_type, "clip_ratio/region_mean")
    if clip_metric in their_metrics:
        assert out.metrics["actor/pg_clipfrac"] == pytest.approx(their_metrics[clip_metric], abs=1e-6)
    if "vespo/phi_seq_mean" in their_metrics:
        assert out.metrics["actor/vespo_phi_seq_mean"] == pytest.approx(their_metrics["vespo/phi_seq_mean"],
                                                                        rel=1e-5)
    if beta and config.loss_agg_mode == "token-mean" and not bias_kl:
        assert out.metrics["actor/kl_loss"] == pytest.approx(their_metrics["kl"], rel=1e-5, abs=1e-6)

"""Hugging Face causal LMs: the policy loss from the backbone's hidden states, never the full logits.

    out = hf_policy_loss(model, input_ids, attention_mask, response_mask, rewards=r, group_ids=g, config=cfg)

runs the model's backbone (``model.get_decoder()``, e.g. ``Qwen2Model``) to its last hidden states and
calls ``linear_policy_loss`` with the model's LM-head weight (the tied embedding matrix when
``tie_word_embeddings``), so only the response positions ever meet the LM head and the
``[B, L, V]`` logits are never built. The result equals computing the logits with the full model and
calling ``policy_loss`` on them.

Positions: ``input_ids [B, L]`` holds prompt + response; ``response_mask [B, L]`` marks the response
tokens. The hidden state at position t predicts token t + 1, so every per-token tensor of the output
(and ``old_logprobs`` / ``ref_logprobs`` / token-level ``advantages`` you pass) is ``[B, L - 1]``,
aligned with ``input_ids[:, 1:]``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..api import LossOutput, linear_policy_loss

__all__ = ["hf_policy_loss", "last_hidden_states", "lm_head_of"]

# Config fields of models whose logits are not a plain linear map of the last hidden state.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def lm_head_of(model: torch.nn.Module):
    """The (weight [V, H], bias [V] or None) of a causal LM's output layer."""
    config = getattr(model, "config", None)
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        if config is not None and getattr(config, name, None) not in (None, 1.0):
            raise NotImplementedError(f"{type(model).__name__} transforms its logits ({name}); "
                                      "use policy_loss on the model's logits instead")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the output layer of {type(model).__name__} is {type(head).__name__}, not nn.Linear")
    return head.weight, head.bias


def last_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The backbone's last hidden states ``[B, L, H]``: what the LM head (``lm_head_of``) maps to logits."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state


def hf_policy_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   response_mask: torch.Tensor, **loss_kwargs) -> LossOutput:
    """``linear_policy_loss`` of a Hugging Face causal LM on prompt + response sequences.

    ``loss_kwargs`` are the keywords of ``policy_loss`` (rewards, group_ids, advantages, old_logprobs,
    ref_logprobs, config, step, global_num_tokens, global_num_seqs, backend).
    """
    if input_ids.shape != response_mask.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                         f"response_mask {tuple(response_mask.shape)} must all be [B, L]")
    if (response_mask.bool() & ~attention_mask.bool()).any():
        raise ValueError("response_mask marks positions that attention_mask excludes")
    weight, bias = lm_head_of(model)
    hidden = last_hidden_states(model, input_ids, attention_mask)
    return linear_policy_loss(hidden[:, :-1].to(weight.dtype), weight, input_ids[:, 1:], response_mask[:, 1:].bool(),
                              bias=bias, **loss_kwargs)

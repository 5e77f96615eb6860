"""verl's FSDP actor with fused-canon token statistics: one pass over the logits, no [N, V] fp32 temporaries.

verl 0.9.1's ``FSDPEngineWithLMHead.prepare_model_outputs`` turns the packed logits ``[nnz, V]`` into
per-token log-probs (flash-attn cross entropy, or log_softmax + gather) and, separately, entropies
(``entropy_from_logits``: softmax in fp32, a ``[nnz, V]`` fp32 temporary, plus the temperature-scaled
copy of the logits). ``FusedTokenStatsFSDPEngine`` computes both with ``fused_canon.token_stats`` in
one read of the logits (Triton on CUDA, the torch reference elsewhere), the temperature applied inside
the kernel, and hands verl the same nested tensors, so verl's losses, metrics and old/ref log-prob
passes use them unchanged.

It is switched on per run by ``+actor_rollout_ref.model.fused_kernel_options.fused_canon_token_stats=true``
(verl's own ``use_fused_kernels`` stays off: that is verl's separate hidden-state kernel). Switched off,
it is verl's engine. The plugin (``fused_canon.integrations.verl``) registers it for NVIDIA GPUs when
verl imports its FSDP engine.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from verl.utils import tensordict_utils as tu
from verl.utils.dataset.dataset_utils import DatasetPadMode
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from ..api import token_stats

__all__ = ["FusedTokenStatsFSDPEngine", "SWITCH", "register_engine"]

SWITCH = "fused_canon_token_stats"  # key of actor_rollout_ref.model.fused_kernel_options

# verl options whose outputs need the full logits or another kernel: refused rather than ignored.
_UNSUPPORTED = {
    "use_fused_kernels": "verl's own fused hidden-state kernel (model.use_fused_kernels) is a different path; "
                         "turn one of the two off",
    "calculate_sum_pi_squared": "sum_pi_squared (optimal token baseline) needs the full softmax",
    "distillation_use_topk": "top-k distillation reads the full logits",
    "distillation_only": "distillation reads the full logits",
}


def _single_temperature(temperature) -> float:
    """verl's temperature (a number, or one per sample) as the one number the kernel takes."""
    if not torch.is_tensor(temperature):
        return float(temperature)
    values = torch.unique(temperature.float())
    if values.numel() != 1:
        raise NotImplementedError(f"{SWITCH} takes one temperature per micro-batch, got {values.tolist()}")
    return float(values.item())


class FusedTokenStatsFSDPEngine(FSDPEngineWithLMHead):
    """``FSDPEngineWithLMHead`` whose log-probs and entropies come from ``fused_canon.token_stats``."""

    def fused_token_stats_enabled(self) -> bool:
        return bool((self.model_config.fused_kernel_options or {}).get(SWITCH, False))

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        if not self.fused_token_stats_enabled():
            return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        for key, why in _UNSUPPORTED.items():
            if tu.get_non_tensor_data(data=micro_batch, key=key, default=False):
                raise NotImplementedError(f"{SWITCH} with {key}=True: {why}")
        if not tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            raise NotImplementedError(f"{SWITCH} needs the packed (remove-padding) layout: "
                                      "set actor_rollout_ref.model.use_remove_padding=true")
        pad_mode = tu.get_non_tensor_data(data=micro_batch, key="pad_mode", default=DatasetPadMode.NO_PADDING)
        if pad_mode != DatasetPadMode.NO_PADDING:
            raise NotImplementedError(f"{SWITCH} supports pad_mode NO_PADDING, got {pad_mode}")

        logits = output.logits.squeeze(0)  # [nnz (+ pad), V], the raw (untempered) logits
        if isinstance(logits, DTensor):  # vocab-sharded under tensor parallelism
            logits = logits.full_tensor()
        log_probs, entropy = token_stats(logits, output_args["input_ids_rmpad_rolled"],
                                         temperature=_single_temperature(micro_batch["temperature"]))

        cu_seqlens = micro_batch["input_ids"].offsets()
        model_output = {"log_probs": self._packed_to_nested(log_probs, output_args["pad_size"], cu_seqlens)}
        if tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False):
            model_output["entropy"] = self._packed_to_nested(entropy, output_args["pad_size"], cu_seqlens)
        return model_output

    def _packed_to_nested(self, values, pad_size, cu_seqlens):
        """Per-token values of the packed sequence -> verl's nested [bsz, j1] layout (Ulysses gather, unpad)."""
        return torch.nested.nested_tensor_from_jagged(self._gather_and_unpad_packed(values, pad_size), cu_seqlens)


def register_engine() -> None:
    """Make verl build this engine for language models under fsdp/fsdp2 on NVIDIA GPUs.

    verl's registry prefers a (device, vendor) entry over its device-only one, so this takes over
    exactly there; with the switch off the engine behaves as verl's."""
    EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cuda",
                            vendor="nvidia")(FusedTokenStatsFSDPEngine)

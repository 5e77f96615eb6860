"""Trainer configuration: nested dataclasses (the schema *and* the defaults), YAML files, dotted overrides.

The defaults below are the embedded default run of ``fused-canon train`` (no arguments): a tiny
char-level Qwen2 built in code learns one-digit addition ("7+5=" -> "12", "3+4=" -> "07") from
random weights with CANON advantages, on 2 CPU cores, downloading nothing. The reward is digit-wise
partial credit, so the untrained policy already scores about 0.05 and the signal is there from the
first step. ``fused-canon train --print-config`` prints them as YAML.

Loading order: the defaults, then an optional user YAML (``--config``), then ``key=value`` overrides
from the command line, e.g. ``actor.lr=3e-3 algorithm.advantage.estimator=grpo``.

The ``critic`` section configures the value model that an estimator reading values (gae) gets.

The ``algorithm`` section *is* ``fused_canon.LossConfig`` (with ``algorithm.advantage`` being
``fused_canon.AdvantageConfig``), so every field of the loss API is configurable under the same
name and is validated by the loss API itself.

Every value is checked before anything runs (``check_config``): a bad one raises ``ConfigError``
naming the field, the value and what is allowed, which the CLI prints without a traceback (exit 2).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import fused_canon as fc

from . import tasks


class ConfigError(ValueError):
    """A bad config value, key or file; the message names it and what is allowed."""


GROUP_ESTIMATORS = ("grpo", "qae", "rloo", "canon")  # compare the samples of one prompt: need rollout.n >= 2
DTYPES = ("float32", "bfloat16", "float16")
LOGGERS = ("console", "jsonl", "tensorboard")
MAX_SEED = 2**32  # numpy's legacy seed (seed_everything) must lie in [0, 2**32)


@dataclass
class ModelConfig:
    # "tiny-char": a small char-level Qwen2 built in code (nothing downloaded); anything else is
    # a Hugging Face model directory or hub name loaded with AutoModelForCausalLM.
    path: str = "tiny-char"
    hidden_size: int = 64  # the tiny-char fields below are ignored for a real model path
    num_layers: int = 2
    num_heads: int = 2  # head_dim = hidden_size / num_heads; vLLM's CPU attention needs >= 32
    intermediate_size: int = 256
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    # The base model RL starts from: sft_steps supervised steps on a synthetic task's reference
    # answers (prompt -> answer <eos>, with an optimizer of their own) before the first RL step, so
    # that some prompts are solved at step 1 and others are not. 0: RL starts from the initial weights.
    sft_steps: int = 0
    sft_lr: float = 1e-3
    sft_batch_size: int = 64  # examples per supervised step


@dataclass
class DataConfig:
    # A synthetic task ("arithmetic", "digit_sequence", "reverse", "sort", "sort_exact") or "gsm8k",
    # which reads a JSONL/parquet file from data.path and scores GSM8K-style "#### answer" responses.
    task: str = "arithmetic"
    task_options: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the task generator
    path: str = ""
    prompt_key: str = "question"
    answer_key: str = "answer"
    reward_fn: str = ""  # "" -> the task's own reward; else "pkg.module:function" (response, answer) -> float
    train_batch_size: int = 16  # prompts per step (each sampled rollout.n times)
    max_prompt_length: int = 256  # tokens; longer prompts are an error (vLLM sizes its context from this)
    max_response_length: int = 2  # new tokens per response; 2 = the arithmetic answer's width (no <eos> needed)
    val_batch_size: int = 64  # held-out prompts for the greedy validation every trainer.test_freq steps


@dataclass
class ActorConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0  # max global gradient norm
    ppo_epochs: int = 1  # updates per rollout batch; > 1 uses recomputed old log-probs
    ppo_mini_batch_size: int = 0  # prompts per optimizer step; 0 -> the whole batch (one step)
    micro_batch_size: int = 0  # sequences per forward/backward; 0 -> the whole mini-batch
    loss_fn: str = "policy_loss"  # "policy_loss" (logits) | "linear_policy_loss" (hidden + LM head)
    loss_backend: str = "auto"  # "auto" | "triton" | "torch"


@dataclass
class CriticConfig:
    """The value model, built and trained when the estimator reads values (gae: Open-Reasoner-Zero's PPO).

    It is the policy's network (model.*: the tiny-char model, or the same HF model path) with a scalar
    head in place of the LM head, updated in the actor's epochs, mini-batches and micro-batches with
    verl's clipped value loss, aggregated with algorithm.loss_agg_mode, by an optimizer of its own."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0  # max global gradient norm
    cliprange_value: float = 0.5  # a value moves at most this far from the rollout's value (verl's default)


@dataclass
class RolloutConfig:
    engine: str = "hf"  # "hf" (transformers generate) | "vllm"
    n: int = 8  # samples per prompt (the group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 disables top-k
    gpu_memory_utilization: float = 0.3  # vllm only
    free_cache_when_training: bool = False  # vllm: sleep() during the update (CUDA sleep mode only)


@dataclass
class TrainerConfig:
    total_steps: int = 200
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    # torch threads per process; 0 leaves torch's default (one per core). 1: on a shared 2-core machine
    # two threads spin-wait on each other whenever a neighbour holds a core (README, Train: measured).
    num_threads: int = 1
    out_dir: str = "runs/default"
    logger: List[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])
    progress_bar: bool = True
    plot: bool = True  # write <out_dir>/metrics.png at the end
    test_freq: int = 20  # greedy validation every N steps (0: never)
    save_freq: int = 50  # checkpoint every N steps (0: only when the run ends)
    max_ckpt_to_keep: int = 2  # 0: keep all
    resume: bool = False  # continue from the newest intact checkpoint in <out_dir>/checkpoints
    resume_from: str = ""  # or from this global_step_N directory
    overwrite: bool = False  # replace the outputs of an earlier run in out_dir (without it: refused)
    plugins: List[str] = field(default_factory=list)  # modules imported in every process (registrations)
    # A directory for base models (model.sft_steps), each under a key of everything it depends on:
    # runs that share one (compare's methods of a seed) train it once. "": train it in every run.
    base_model_cache: str = ""


@dataclass
class RayConfig:
    enabled: bool = False
    # An existing cluster ("auto" or host:port); setting it implies enabled. The trainer then uses
    # that cluster as it is: whoever can reach it can run code on it (see the README's security note).
    address: str = ""
    num_cpus: int = 2  # logical CPUs declared to a local cluster; bundles must fit in them
    learner_num_cpus: float = 1.0
    rollout_num_cpus: float = 1.0
    num_gpus: float = 0.0  # per actor; learner and rollout share a GPU when both ask for a fraction
    timeout_s: float = 600.0  # every ray.get waits at most this long


def _demo_loss_config() -> fc.LossConfig:
    """The default run's loss: CANON advantages, DAPO's clip-higher upper ratio."""
    return fc.LossConfig(advantage=fc.AdvantageConfig(estimator="canon"), clip_ratio_high=0.28)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: fc.LossConfig = field(default_factory=_demo_loss_config)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ----------------------------------------------------------------------------- loading

def load_config(yaml_path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """Merge the defaults, a user YAML and ``key=value`` overrides, then check every value.

    Raises ``ConfigError`` for an unknown key (naming the valid keys at that level), a value of
    the wrong type, a missing or malformed file, and every value ``check_config`` rejects.
    """
    schema = OmegaConf.structured(TrainConfig)
    layers = []
    if yaml_path:
        layers.append((yaml_path, _read_yaml(yaml_path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    merged = schema
    for source, layer in layers:
        _reject_unknown_keys(schema, layer, prefix="", source=source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{error.full_key}: {str(error.msg).splitlines()[0]} (from {source})") from None
    try:
        cfg: TrainConfig = OmegaConf.to_object(merged)  # builds the dataclasses, running fc's checks
    except (ValueError, TypeError) as error:  # fc.LossConfig names the field within `algorithm`
        raise ConfigError(f"algorithm: {error}") from None
    check_config(cfg)
    return cfg


def _read_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        layer = OmegaConf.load(path)
    except Exception as error:  # yaml's parser errors share no base class with OmegaConf's
        raise ConfigError(f"--config {path} is not valid YAML: {error}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"--config {path} must hold a mapping of sections (model:, actor:, ...), "
                          f"not a {type(layer).__name__}")
    return layer


def _reject_unknown_keys(schema: DictConfig, layer: DictConfig, prefix: str, source: str) -> None:
    for key in layer.keys():
        full_key = f"{prefix}{key}"
        if key not in schema:
            valid = ", ".join(str(k) for k in schema.keys())
            section = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"unknown config key '{full_key}' (from {source}); valid keys in {section}: {valid}")
        child_schema, child = schema[key], layer[key]
        # Recurse into dataclass sections only; free-form dicts (data.task_options) take any key.
        if isinstance(child_schema, DictConfig) and OmegaConf.get_type(child_schema) is not dict \
                and isinstance(child, DictConfig):
            _reject_unknown_keys(child_schema, child, prefix=f"{full_key}.", source=source)


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------- checks

def _fail(key: str, value, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not valid: {allowed}")


def _choice(key: str, value, choices: Sequence) -> None:
    if value not in choices:
        _fail(key, value, f"choose one of {list(choices)}")


def _number(key: str, value, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> None:
    """A finite number in [low, high] (open at an end where asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        low_text = f"{'>' if low_open else '>='} {low:g}"
        high_text = "" if high == math.inf else f" and {'<' if high_open else '<='} {high:g}"
        _fail(key, value, f"must be a finite number {low_text}{high_text}")


def _integer(key: str, value, low: int, high: Optional[int] = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value >= high):
        _fail(key, value, f"must be an integer >= {low}" + ("" if high is None else f" and < {high}"))


def _package(key: str, value, package: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        _fail(key, value, f"needs the {package} package (pip install -e \".[{extra}]\")")


def estimator_reads(advantage: fc.AdvantageConfig, name: str) -> bool:
    """Whether the configured estimator takes the input ``name`` (its declaration in fc.ESTIMATOR_INPUTS):
    the trainer builds the critic for ``values`` and generates the greedy rollout for ``baseline_rewards``
    only where one is read."""
    declared = fc.estimators.declared_inputs(advantage.estimator)
    return name in declared.required + declared.optional


def advantage_step_error(advantage: fc.AdvantageConfig) -> Optional[str]:
    """Why the trainer's advantage step cannot run this config, or None. The step gives the estimator
    the rewards, the prompt groups, the response mask, the token entropy and ids, the old log-probs and
    the logits' other signals (Learner.compute_advantages, or the fused loss call), the critic's values
    and the greedy rollout's rewards (where the estimator reads them); a two-response dry run on those
    inputs lets fused_canon itself refuse what it lacks (a custom CANON metric, a quantile baseline for
    an estimator with a baseline of its own)."""
    per_token = torch.zeros(2, 1)
    try:
        fc.compute_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), config=advantage,
                              mask=torch.ones(2, 1, dtype=torch.bool), token_entropy=per_token,
                              token_ids=torch.zeros(2, 1, dtype=torch.long), old_logprobs=per_token,
                              self_certainty=per_token, target_logits=per_token, sum_pi_squared=per_token,
                              values=per_token, baseline_rewards=torch.zeros(2))
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def loss_error(loss: fc.LossConfig) -> Optional[str]:
    """Why the policy loss refuses this config (e.g. geo_mean with a token-level loss_agg_mode), or None:
    a one-token dry run of the objective."""
    try:
        fc.policy_loss_from_logprobs(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), advantages=torch.zeros(1),
                                     entropy=torch.zeros(1, 1), ref_logprobs=torch.zeros(1, 1), config=loss,
                                     backend="torch")
    except ValueError as error:
        return str(error)
    return None


def runnable_estimators() -> List[str]:
    """The registered estimators the trainer's advantage step can run with their default settings."""
    return [name for name in sorted(fc.ESTIMATORS) if advantage_step_error(fc.AdvantageConfig(estimator=name)) is None]


def _import_plugins(plugins: List[str]) -> None:
    try:
        tasks.import_plugins(plugins)
    except ImportError as error:
        _fail("trainer.plugins", list(plugins), f"cannot import {error.name!r} ({error})")


def _optimizer_fields(section: str, optim) -> None:
    """lr, weight_decay, betas and grad_clip of the actor's or the critic's AdamW."""
    _number(f"{section}.lr", optim.lr, 0, low_open=True)
    _number(f"{section}.weight_decay", optim.weight_decay, 0)
    if not isinstance(optim.betas, (list, tuple)) or len(optim.betas) != 2:
        _fail(f"{section}.betas", optim.betas, "must be two numbers [beta1, beta2], each in [0, 1)")
    for index, beta in enumerate(optim.betas):
        _number(f"{section}.betas[{index}]", beta, 0, 1, high_open=True)
    _number(f"{section}.grad_clip", optim.grad_clip, 0, low_open=True)


def check_config(cfg: TrainConfig) -> None:
    """Every check that no single field type can make; raises ConfigError at the first bad value.

    Runs before anything is built (``load_config`` and ``train`` call it). Imports the configured
    plugins, since they may register the estimator or loss names that the config uses.
    """
    model, data, actor, rollout, trainer, ray = cfg.model, cfg.data, cfg.actor, cfg.rollout, cfg.trainer, cfg.ray
    _import_plugins(trainer.plugins)

    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        _integer(f"model.{name}", getattr(model, name), 1)
    if model.hidden_size % model.num_heads:
        _fail("model.num_heads", model.num_heads, f"must divide model.hidden_size={model.hidden_size}")
    _choice("model.dtype", model.dtype, DTYPES)
    _integer("model.sft_steps", model.sft_steps, 0)
    _number("model.sft_lr", model.sft_lr, 0, low_open=True)
    _integer("model.sft_batch_size", model.sft_batch_size, 1)
    if model.sft_steps and data.task == "gsm8k":
        _fail("model.sft_steps", model.sft_steps, "needs a synthetic task (its answers are the demonstrations); "
              "data.task=gsm8k has final answers only")

    for name in ("train_batch_size", "max_prompt_length", "max_response_length", "val_batch_size"):
        _integer(f"data.{name}", getattr(data, name), 1)
    try:
        tasks.check_data_config(data)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    _optimizer_fields("actor", actor)
    _integer("actor.ppo_epochs", actor.ppo_epochs, 1)
    _integer("actor.ppo_mini_batch_size", actor.ppo_mini_batch_size, 0)
    if actor.ppo_mini_batch_size and data.train_batch_size % actor.ppo_mini_batch_size:
        _fail("actor.ppo_mini_batch_size", actor.ppo_mini_batch_size,
              f"must be 0 or divide data.train_batch_size={data.train_batch_size}")
    _integer("actor.micro_batch_size", actor.micro_batch_size, 0)
    _choice("actor.loss_fn", actor.loss_fn, ("policy_loss", "linear_policy_loss"))
    _choice("actor.loss_backend", actor.loss_backend, ("auto", "triton", "torch"))
    if actor.loss_backend == "triton":
        _package("actor.loss_backend", actor.loss_backend, "triton", "triton")

    _optimizer_fields("critic", cfg.critic)
    _number("critic.cliprange_value", cfg.critic.cliprange_value, 0, low_open=True)

    _choice("rollout.engine", rollout.engine, ("hf", "vllm"))
    if rollout.engine == "vllm":
        _package("rollout.engine", rollout.engine, "vllm", "vllm")
    _integer("rollout.n", rollout.n, 1)
    _number("rollout.temperature", rollout.temperature, 0, low_open=True)
    _number("rollout.top_p", rollout.top_p, 0, 1, low_open=True)
    if rollout.top_k != -1:
        _integer("rollout.top_k", rollout.top_k, 1)
    _number("rollout.gpu_memory_utilization", rollout.gpu_memory_utilization, 0, 1, low_open=True)

    estimator = cfg.algorithm.advantage.estimator
    if estimator not in fc.ESTIMATORS:
        _fail("algorithm.advantage.estimator", estimator,
              f"choose one of {runnable_estimators()} (plugins in trainer.plugins may register more)")
    reason = advantage_step_error(cfg.algorithm.advantage)
    if reason:
        _fail("algorithm.advantage.estimator", estimator, f"the trainer cannot run it: {reason}")
    _choice("algorithm.loss_mode", cfg.algorithm.loss_mode, sorted(fc.POLICY_LOSSES))
    reason = loss_error(cfg.algorithm)
    if reason:
        _fail("algorithm.loss_mode", cfg.algorithm.loss_mode, reason)
    if rollout.n < 2 and estimator in GROUP_ESTIMATORS:
        _fail("rollout.n", rollout.n, f"estimator {estimator!r} compares the samples of one prompt: must be >= 2")

    _integer("trainer.total_steps", trainer.total_steps, 1)
    _integer("trainer.seed", trainer.seed, 0, MAX_SEED)
    _choice("trainer.device", trainer.device, ("auto", "cpu", "cuda"))
    if trainer.device == "cuda" and not torch.cuda.is_available():
        _fail("trainer.device", trainer.device, "no CUDA device is available here; use cpu or auto")
    _integer("trainer.num_threads", trainer.num_threads, 0)
    if not trainer.out_dir:
        _fail("trainer.out_dir", trainer.out_dir, "must name a directory")
    for logger in trainer.logger:
        _choice("trainer.logger entry", logger, LOGGERS)
    if "tensorboard" in trainer.logger:
        _package("trainer.logger entry", "tensorboard", "tensorboard", "train")
    if trainer.progress_bar:
        _package("trainer.progress_bar", True, "tqdm", "train")
    if trainer.plot and "jsonl" in trainer.logger:
        _package("trainer.plot", True, "matplotlib", "train")
    for name in ("test_freq", "save_freq", "max_ckpt_to_keep"):
        _integer(f"trainer.{name}", getattr(trainer, name), 0)
    if trainer.resume_from and not os.path.isdir(trainer.resume_from):
        _fail("trainer.resume_from", trainer.resume_from, "no such checkpoint directory")
    if trainer.overwrite and (trainer.resume or trainer.resume_from):
        _fail("trainer.overwrite", True, "replaces the run that trainer.resume / trainer.resume_from continues")

    _integer("ray.num_cpus", ray.num_cpus, 1)
    _number("ray.learner_num_cpus", ray.learner_num_cpus, 0, low_open=True)
    _number("ray.rollout_num_cpus", ray.rollout_num_cpus, 0, low_open=True)
    _number("ray.num_gpus", ray.num_gpus, 0)
    _number("ray.timeout_s", ray.timeout_s, 0, low_open=True)

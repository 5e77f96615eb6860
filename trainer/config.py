"""Trainer configuration: nested dataclasses (the schema), YAML files and dotted overrides.

Loading order: the dataclass defaults below, then the shipped ``configs/default.yaml`` (the
embedded default run), then an optional user YAML, then ``key=value`` overrides from the
command line, e.g. ``actor.lr=3e-3 algorithm.advantage.estimator=grpo``.

The ``algorithm`` section *is* ``fused_canon.LossConfig`` (with ``algorithm.advantage`` being
``fused_canon.AdvantageConfig``), so every field of the loss API is configurable under the same
name and is validated by the loss API itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

import fused_canon as fc

DEFAULT_CONFIG_FILE = "default.yaml"

# Named advantage estimators (`fused-canon compare --estimators`, run titles): name -> (estimator, baseline).
ESTIMATOR_PRESETS = {"grpo": ("grpo", "mean"), "qae": ("grpo", "quantile"), "dr_grpo": ("dr_grpo", "mean"),
                     "rloo": ("rloo", "mean"), "canon": ("canon", "mean")}


def estimator_name(advantage: fc.AdvantageConfig) -> str:
    """The ESTIMATOR_PRESETS name of an advantage config (qae = grpo with a quantile baseline), else its estimator."""
    for name, pair in ESTIMATOR_PRESETS.items():
        if pair == (advantage.estimator, advantage.baseline):
            return name
    return advantage.estimator


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


@dataclass
class DataConfig:
    # A synthetic task ("arithmetic", "digit_sequence", "reverse", "sort") or "gsm8k", which reads
    # a JSONL/parquet file from data.path and scores GSM8K-style "#### answer" responses.
    task: str = "arithmetic"
    task_options: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the task generator
    path: str = ""
    prompt_key: str = "question"
    answer_key: str = "answer"
    reward_fn: str = ""  # "" -> the task's own reward; else "pkg.module:function" (response, answer) -> float
    train_batch_size: int = 16  # prompts per step (each sampled rollout.n times)
    max_prompt_length: int = 256  # tokens; longer prompts are an error (vLLM sizes its context from this)
    max_response_length: int = 8  # new tokens per response
    val_batch_size: int = 64  # held-out prompts for the greedy validation every trainer.test_freq steps


@dataclass
class ActorConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    ppo_epochs: int = 1  # updates per rollout batch; > 1 uses recomputed old log-probs
    ppo_mini_batch_size: int = 0  # prompts per optimizer step; 0 -> the whole batch (one step)
    micro_batch_size: int = 0  # sequences per forward/backward; 0 -> the whole mini-batch
    loss_fn: str = "policy_loss"  # "policy_loss" (logits) | "linear_policy_loss" (hidden + LM head)
    loss_backend: str = "auto"  # "auto" | "triton" | "torch"


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
    total_steps: int = 100
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    num_threads: int = 0  # torch threads per process; 0 leaves torch's default
    out_dir: str = "runs/default"
    logger: List[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])
    progress_bar: bool = True
    plot: bool = True  # write <out_dir>/metrics.png at the end
    test_freq: int = 0  # greedy validation every N steps (0: never)
    save_freq: int = 0  # checkpoint every N steps (0: only when the run ends)
    max_ckpt_to_keep: int = 2
    resume: bool = False  # continue from <out_dir>/checkpoints/latest
    resume_from: str = ""  # or from this global_step_N directory
    plugins: List[str] = field(default_factory=list)  # modules imported in every process (registrations)


@dataclass
class RayConfig:
    enabled: bool = False
    address: str = ""  # an existing cluster ("auto" or host:port); setting it implies enabled
    num_cpus: int = 2  # logical CPUs declared to a local cluster; bundles must fit in them
    learner_num_cpus: float = 1.0
    rollout_num_cpus: float = 1.0
    num_gpus: float = 0.0  # per actor; learner and rollout share a GPU when both ask for a fraction
    timeout_s: float = 600.0  # every ray.get waits at most this long


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: fc.LossConfig = field(default_factory=fc.LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def default_yaml_text() -> str:
    return resources.files("fused_canon.trainer").joinpath("configs", DEFAULT_CONFIG_FILE).read_text()


def load_config(yaml_path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """Merge defaults, the shipped default.yaml, a user YAML and ``key=value`` overrides.

    Unknown keys raise ``ValueError`` naming the valid keys at that level; invalid values are
    rejected by the dataclasses (e.g. ``fc.LossConfig`` checks its choices).
    """
    schema = OmegaConf.structured(TrainConfig)
    layers = [("default.yaml", OmegaConf.create(default_yaml_text()))]
    if yaml_path:
        layers.append((yaml_path, OmegaConf.load(yaml_path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key=value, got {bad}")
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    merged = schema
    for source, layer in layers:
        _reject_unknown_keys(schema, layer, prefix="", source=source)
        merged = OmegaConf.merge(merged, layer)
    cfg: TrainConfig = OmegaConf.to_object(merged)  # builds the dataclasses, running their checks
    _check(cfg)
    return cfg


def _reject_unknown_keys(schema: DictConfig, layer: DictConfig, prefix: str, source: str) -> None:
    for key in layer.keys():
        full_key = f"{prefix}{key}"
        if key not in schema:
            valid = ", ".join(str(k) for k in schema.keys())
            section = prefix.rstrip(".") or "the top level"
            raise ValueError(f"unknown config key '{full_key}' (from {source}); valid keys in {section}: {valid}")
        child_schema, child = schema[key], layer[key]
        # Recurse into dataclass sections only; free-form dicts (data.task_options) take any key.
        if isinstance(child_schema, DictConfig) and OmegaConf.get_type(child_schema) is not dict \
                and isinstance(child, DictConfig):
            _reject_unknown_keys(child_schema, child, prefix=f"{full_key}.", source=source)


def _check(cfg: TrainConfig) -> None:
    """Cross-field checks that no single dataclass can make."""
    choices = {
        "actor.loss_fn": (cfg.actor.loss_fn, ("policy_loss", "linear_policy_loss")),
        "actor.loss_backend": (cfg.actor.loss_backend, ("auto", "triton", "torch")),
        "rollout.engine": (cfg.rollout.engine, ("hf", "vllm")),
        "trainer.device": (cfg.trainer.device, ("auto", "cpu", "cuda")),
        "model.dtype": (cfg.model.dtype, ("float32", "bfloat16", "float16")),
    }
    for name, (value, valid) in choices.items():
        if value not in valid:
            raise ValueError(f"{name}={value!r} is not valid; choose one of {list(valid)}")
    for logger in cfg.trainer.logger:
        if logger not in ("console", "jsonl", "tensorboard"):
            raise ValueError(f"trainer.logger entry {logger!r} is not valid; choose from console, jsonl, tensorboard")
    positive = {"data.train_batch_size": cfg.data.train_batch_size, "rollout.n": cfg.rollout.n,
                "data.max_response_length": cfg.data.max_response_length, "actor.ppo_epochs": cfg.actor.ppo_epochs,
                "trainer.total_steps": cfg.trainer.total_steps}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    mini = cfg.actor.ppo_mini_batch_size
    if mini < 0 or (mini and cfg.data.train_batch_size % mini):
        raise ValueError(f"actor.ppo_mini_batch_size={mini} must be 0 or divide data.train_batch_size="
                         f"{cfg.data.train_batch_size}")
    if cfg.actor.micro_batch_size < 0:
        raise ValueError("actor.micro_batch_size must be >= 0")
    if cfg.rollout.n < 2 and cfg.algorithm.advantage.estimator in ("grpo", "rloo", "canon"):
        raise ValueError(f"estimator {cfg.algorithm.advantage.estimator!r} compares samples of one prompt: "
                         "rollout.n must be >= 2")


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

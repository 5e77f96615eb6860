"""Where the learner and the rollout engine run: in this process, or as Ray actors.

The driver talks to both through ``Worker.call(method, *args)``. ``LocalWorker`` calls the object
directly; ``RayWorker`` calls the same class running as a Ray actor and waits with a timeout.
Both layouts therefore run exactly the same Learner and engine code.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Tuple

from .config import TrainConfig
from .learner import Learner
from .model import TINY_CHAR, build_model, resolve_device
from .rollout import HFEngine, VLLMEngine


class LocalWorker:
    def __init__(self, obj):
        self.obj = obj

    def call(self, method: str, *args) -> Any:
        return getattr(self.obj, method)(*args)


class RayWorker:
    def __init__(self, actor, timeout_s: float):
        self.actor, self.timeout_s = actor, timeout_s

    def call(self, method: str, *args) -> Any:
        import ray

        return ray.get(getattr(self.actor, method).remote(*args), timeout=self.timeout_s)


def sync_weights(learner, engine) -> None:
    """Push the learner's weights into the rollout engine."""
    if isinstance(learner, RayWorker) and isinstance(engine, RayWorker):
        import ray

        # Hand the engine the reference: the tensors go actor to actor through the object store.
        weights = learner.actor.named_weights.remote()
        ray.get(engine.actor.update_weights.remote(weights), timeout=engine.timeout_s)
    else:
        engine.call("update_weights", learner.call("named_weights"))


def engine_spec(cfg: TrainConfig, tokenizer, out_dir: str) -> Tuple[type, dict]:
    """The rollout engine's class and constructor arguments (built here or inside an actor)."""
    if cfg.rollout.engine == "hf":
        device = str(resolve_device(cfg.trainer.device))
        return HFEngine, dict(model_cfg=cfg.model, tokenizer=tokenizer, device=device, seed=cfg.trainer.seed)
    model_dir = cfg.model.path
    if model_dir == TINY_CHAR:  # vLLM loads from a directory: save the in-code model's config and weights
        model_dir = os.path.join(out_dir, "rollout_model")
        build_model(cfg.model, tokenizer, cfg.trainer.seed).save_pretrained(model_dir)
    return VLLMEngine, dict(model_dir=model_dir, tokenizer=tokenizer,
                            max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length,
                            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, dtype=cfg.model.dtype,
                            enable_sleep_mode=cfg.rollout.free_cache_when_training, seed=cfg.trainer.seed)


def start_workers(cfg: TrainConfig, tokenizer, out_dir: str):
    """Returns (learner, engine, stop): Ray actors when cfg.ray.enabled or cfg.ray.address, else
    objects in this process. ``stop()`` releases the actors and their placement group."""
    engine_cls, engine_kwargs = engine_spec(cfg, tokenizer, out_dir)
    if not (cfg.ray.enabled or cfg.ray.address):
        return LocalWorker(Learner(cfg, tokenizer)), LocalWorker(engine_cls(**engine_kwargs)), lambda: None

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    init_ray(cfg)
    learner_bundle = {"CPU": cfg.ray.learner_num_cpus}
    rollout_bundle = {"CPU": cfg.ray.rollout_num_cpus}
    if cfg.ray.num_gpus:
        learner_bundle["GPU"] = rollout_bundle["GPU"] = cfg.ray.num_gpus
    # A placement group that asks for more than the cluster has never becomes ready: fail loudly instead.
    wanted = cfg.ray.learner_num_cpus + cfg.ray.rollout_num_cpus
    available = ray.cluster_resources().get("CPU", 0)
    if wanted > available:
        raise ValueError(f"ray.learner_num_cpus + ray.rollout_num_cpus = {wanted} exceeds the cluster's {available} "
                         "CPUs (raise ray.num_cpus: it is a logical count)")
    group = placement_group([learner_bundle, rollout_bundle], strategy="PACK")
    ray.get(group.ready(), timeout=cfg.ray.timeout_s)

    def in_bundle(index: int, bundle: dict):
        return dict(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index))

    learner = ray.remote(Learner).options(**in_bundle(0, learner_bundle)).remote(cfg, tokenizer)
    engine = ray.remote(engine_cls).options(**in_bundle(1, rollout_bundle)).remote(**engine_kwargs)

    def stop() -> None:  # a later run in this process needs the CPUs back
        ray.kill(learner)
        ray.kill(engine)
        remove_placement_group(group)

    return RayWorker(learner, cfg.ray.timeout_s), RayWorker(engine, cfg.ray.timeout_s), stop


def init_ray(cfg: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster needs no token
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Actors must import plugins and fused_canon the way the driver does: give them its module path.
    python_path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    runtime_env = {"env_vars": {"PYTHONPATH": python_path, "RAY_AUTH_MODE": "disabled"}}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env=runtime_env)

"""Where the learner and the rollout engine run: in this process, or as Ray actors.

The driver holds a ``LearnerProxy`` and an ``EngineProxy``: typed handles whose methods are the
Learner's and the engine's methods of the same name (go-to-definition leads from one to the
other). Each proxy hands its calls to a runner: ``_InProcess`` calls the object directly,
``_InActor`` calls the same object inside a Ray actor (``WorkerHost``) and waits with a timeout.
Both layouts therefore run exactly the same Learner and engine code.

Every process that runs trainer code starts with ``setup_process`` (torch threads, plugin
imports): the driver in ``train``, each Ray actor in ``WorkerHost.__init__``.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch

from .config import ConfigError, TrainConfig, TrainerConfig
from .learner import Learner
from .model import TINY_CHAR, build_model, resolve_device
from .rollout import HFEngine, Rollout, RolloutEngine, Sampling, VLLMEngine
from .tasks import import_plugins


def setup_process(trainer_cfg: TrainerConfig) -> None:
    """What every process of a run needs before it builds anything: registries are per process
    (so the plugins are imported in each) and so is torch's thread count."""
    if trainer_cfg.num_threads:
        torch.set_num_threads(trainer_cfg.num_threads)
    import_plugins(trainer_cfg.plugins)


# ----------------------------------------------------------------------------- runners

class _InProcess:
    def __init__(self, obj):
        self.obj = obj

    def submit(self, method: Callable, *args) -> Any:
        return getattr(self.obj, method.__name__)(*args)

    def wait(self, pending: Any) -> Any:
        return pending


class _InActor:
    def __init__(self, actor, timeout_s: float):
        self.actor, self.timeout_s = actor, timeout_s

    def submit(self, method: Callable, *args) -> Any:
        # An ObjectRef among args is resolved by Ray before the call: it travels actor to actor.
        return self.actor.run.remote(method.__name__, *args)

    def wait(self, pending: Any) -> Any:
        import ray

        return ray.get(pending, timeout=self.timeout_s)


class WorkerHost:
    """The Ray actor class: sets the process up, then builds and serves one Learner or engine."""

    def __init__(self, trainer_cfg: TrainerConfig, cls: type, kwargs: Dict[str, Any]):
        setup_process(trainer_cfg)
        self.obj = cls(**kwargs)

    def run(self, method_name: str, *args) -> Any:
        return getattr(self.obj, method_name)(*args)


# ----------------------------------------------------------------------------- proxies

class _Proxy:
    def __init__(self, runner):
        self._runner = runner

    def _call(self, method: Callable, *args) -> Any:
        return self._runner.wait(self._runner.submit(method, *args))


class LearnerProxy(_Proxy):
    """The driver's handle on the ``Learner``."""

    def warm_start(self) -> Dict[str, float]:
        return self._call(Learner.warm_start)

    def compute_advantages(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, torch.Tensor]:
        return self._call(Learner.compute_advantages, batch, step)

    def update(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        return self._call(Learner.update, batch, step)

    def save(self, directory: str) -> None:
        self._call(Learner.save, directory)

    def load(self, directory: str) -> None:
        self._call(Learner.load, directory)


class EngineProxy(_Proxy):
    """The driver's handle on the rollout engine (``RolloutEngine``: HFEngine or VLLMEngine)."""

    def generate(self, prompt_ids: List[List[int]], n: int, sampling: Sampling) -> Rollout:
        return self._call(RolloutEngine.generate, prompt_ids, n, sampling)

    def load_weights_from(self, learner: LearnerProxy) -> None:
        """Push the learner's current weights into the engine (under Ray: actor to actor through the
        object store, never through the driver)."""
        weights = learner._runner.submit(Learner.named_weights)
        self._call(RolloutEngine.update_weights, weights)

    def sleep(self) -> None:
        self._call(RolloutEngine.sleep)

    def wake(self) -> None:
        self._call(RolloutEngine.wake)

    def reset_cache(self) -> None:
        self._call(RolloutEngine.reset_cache)


@dataclass
class Workers:
    """``with start_workers(...) as workers:`` releases the Ray actors and their placement group at
    the end (a later run in this process needs the CPUs back); a no-op in process."""

    learner: LearnerProxy
    engine: EngineProxy
    stop: Callable[[], None]

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------- starting them

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


def start_workers(cfg: TrainConfig, tokenizer, out_dir: str) -> Workers:
    """The learner and the engine: Ray actors when cfg.ray.enabled or cfg.ray.address, else
    objects in this process (which ``train`` has already set up)."""
    engine_cls, engine_kwargs = engine_spec(cfg, tokenizer, out_dir)
    learner_kwargs = dict(cfg=cfg, tokenizer=tokenizer)
    if not (cfg.ray.enabled or cfg.ray.address):
        return Workers(LearnerProxy(_InProcess(Learner(**learner_kwargs))),
                       EngineProxy(_InProcess(engine_cls(**engine_kwargs))), stop=lambda: None)

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
        raise ConfigError(f"ray.learner_num_cpus + ray.rollout_num_cpus = {wanted} exceeds the cluster's "
                          f"{available} CPUs (raise ray.num_cpus: it is a logical count)")
    group = placement_group([learner_bundle, rollout_bundle], strategy="PACK")
    ray.get(group.ready(), timeout=cfg.ray.timeout_s)

    def actor(index: int, bundle: dict, cls: type, kwargs: dict) -> _InActor:
        options = dict(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                       scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index))
        handle = ray.remote(WorkerHost).options(**options).remote(cfg.trainer, cls, kwargs)
        return _InActor(handle, cfg.ray.timeout_s)

    learner = actor(0, learner_bundle, Learner, learner_kwargs)
    engine = actor(1, rollout_bundle, engine_cls, engine_kwargs)

    def stop() -> None:
        ray.kill(learner.actor)
        ray.kill(engine.actor)
        remove_placement_group(group)

    return Workers(LearnerProxy(learner), EngineProxy(engine), stop)


def init_ray(cfg: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Actors must import plugins and fused_canon the way the driver does: give them its module path.
    python_path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    runtime_env = {"env_vars": {"PYTHONPATH": python_path}}
    if cfg.ray.address:  # an existing cluster, used as it is: its exposure is its owner's choice
        ray.init(address=cfg.ray.address, runtime_env=runtime_env)
        return
    _serve_this_machine_only()
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env=runtime_env)


def _serve_this_machine_only() -> None:
    """Whoever can connect to a Ray cluster can run code in it, so the cluster the trainer starts
    accepts connections from this machine only, and only with a token:

    - Ray binds its servers to the node's address, and takes 127.0.0.1 as that address when it runs
      as a single-machine cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by Ray once, at import;
      hence the constant too, for a process that imported ray already). Measured with Ray 2.60:
      without it, gcs_server, raylet and the workers listen on every interface.
    - Ray's token authentication, which a new local cluster turns on when RAY_AUTH_MODE is unset
      (Ray >= 2.52), stays on: RAY_AUTH_MODE is left to the user, and the token is a random one per
      driver process, in the environment that the cluster's processes inherit (so nothing is
      written to ~/.ray/auth_token). An explicit RAY_AUTH_TOKEN is kept.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

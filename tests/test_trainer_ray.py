"""The trainer with its learner and rollout engine as Ray actors (a local 2-CPU cluster)."""

import os
import textwrap

import pytest

pytest.importorskip("transformers")
ray = pytest.importorskip("ray")

from fused_canon.trainer.config import load_config  # noqa: E402
from fused_canon.trainer.trainer import train  # noqa: E402
from fused_canon.trainer.tracking import read_metrics  # noqa: E402

pytestmark = pytest.mark.ray

PLUGIN = textwrap.dedent('''
    """A plugin module: imported by the driver and by every actor (trainer.plugins)."""
    import os

    import torch

    import fused_canon as fc
    from fused_canon.estimators import ESTIMATORS


    def trace(event):
        with open(os.environ["PLUGIN_TRACE"], "a") as f:
            f.write(f"{event} {os.getpid()} {torch.get_num_threads()}\\n")


    trace("import")  # which processes imported it, with the torch threads they were set up with


    @fc.register_estimator("grpo_from_plugin")
    def grpo_from_plugin(rewards, groups, config, **kwargs):
        trace("estimate")  # which process ran it, then defers to the built-in GRPO
        return ESTIMATORS["grpo"](rewards, groups, config, **kwargs)


    def length_reward(response, answer):
        return min(len(response), 4) / 4
''')


@pytest.fixture
def ray_env(tmp_path, monkeypatch):
    (tmp_path / "trainer_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))  # init_ray hands the driver's sys.path to the actors
    monkeypatch.setenv("PLUGIN_TRACE", str(tmp_path / "trace.txt"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield tmp_path
    ray.shutdown()


def test_ray_run_with_plugins(ray_env):
    out = ray_env / "run"
    common = ["ray.enabled=true", "ray.num_cpus=2", "ray.timeout_s=120", f"trainer.out_dir={out}",
              "trainer.progress_bar=false", "trainer.logger=[jsonl]", "trainer.plot=false"]
    cfg = load_config(overrides=common + [
        "trainer.total_steps=3", "trainer.test_freq=0", "trainer.save_freq=0", "data.train_batch_size=4",
        "rollout.n=4", "model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
        "trainer.plugins=[trainer_test_plugin]", "algorithm.advantage.estimator=grpo_from_plugin",
        "trainer.num_threads=1",
        "data.reward_fn=trainer_test_plugin:length_reward",
    ])
    train(cfg)
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.0 <= r["data"]["critic/score/mean"] <= 1.0 for r in rows)
    # Both actors (learner and engine) were set up as the driver is: torch's threads set, then the
    # plugin imported (the driver imported it first to check the estimator name in the config).
    events = [line.split() for line in (ray_env / "trace.txt").read_text().splitlines()]
    imports = {pid: threads for event, pid, threads in events if event == "import"}
    actors = set(imports) - {str(os.getpid())}
    assert str(os.getpid()) in imports and len(actors) == 2, events
    assert all(imports[pid] == "1" for pid in actors), events
    # The learner actor ran the estimator (the driver only dry-runs it to check the config).
    assert {pid for event, pid, _ in events if event == "estimate"} & actors, events
    # The engine samples from synced weights: its log-probs match the learner's.
    assert all(r["data"]["rollout/logprob_abs_diff_mean"] < 1e-4 for r in rows)

    # A placement group asking for more CPUs than the cluster has would wait forever: it must fail fast.
    too_big = load_config(overrides=common + ["ray.learner_num_cpus=2", "ray.rollout_num_cpus=1",
                                              f"trainer.out_dir={ray_env / 'too_big'}"])
    with pytest.raises(ValueError, match="exceeds the cluster"):
        train(too_big)

"""The trainer with its learner and rollout engine as Ray actors (a local 2-CPU cluster)."""

import ipaddress
import os
import sys
import textwrap

import pytest
from packaging.version import Version

pytest.importorskip("transformers")
ray = pytest.importorskip("ray")

from fused_canon.trainer.config import ConfigError, load_config  # noqa: E402
from fused_canon.trainer.trainer import train  # noqa: E402
from fused_canon.trainer.tracking import read_metrics  # noqa: E402
from fused_canon.trainer.workers import init_ray  # noqa: E402
from helpers import logged_steps  # noqa: E402

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


COMMON = ["ray.enabled=true", "ray.num_cpus=2", "ray.timeout_s=120", "trainer.progress_bar=false",
          "trainer.logger=[jsonl]", "trainer.plot=false"]


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """One local cluster for the module, started as the trainer starts it, from an environment
    without Ray's auth settings; the plugin module on the driver's path (which the actors get)."""
    directory = tmp_path_factory.mktemp("ray")
    (directory / "trainer_test_plugin.py").write_text(PLUGIN)
    saved_environ, saved_path = dict(os.environ), list(sys.path)
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        os.environ.pop(name, None)
    os.environ["PLUGIN_TRACE"] = str(directory / "trace.txt")
    sys.path.insert(0, str(directory))
    init_ray(load_config(overrides=COMMON))
    yield directory
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved_environ)
    sys.path[:] = saved_path


def test_the_local_cluster_listens_on_this_machine_only_and_wants_its_token(ray_env):
    """Whoever reaches a Ray cluster can run code in it: every socket that the trainer's cluster
    listens on is a loopback one, and its GCS refuses a request without the cluster's token."""
    import grpc
    psutil = pytest.importorskip("psutil")  # a dependency of ray

    processes = [psutil.Process()] + psutil.Process().children(recursive=True)  # driver, gcs, raylet, workers
    names = {p.pid: p.name() for p in processes}
    listening = [(names[c.pid], c.laddr) for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in names]
    assert any(name == "gcs_server" for name, _ in listening) and any(name == "raylet" for name, _ in listening)
    exposed = [(name, address) for name, address in listening if not _is_loopback(address.ip)]
    assert not exposed, exposed

    if Version(ray.__version__) < Version("2.52"):
        pytest.skip(f"ray {ray.__version__} has no token authentication (it came with Ray 2.52)")
    channel = grpc.insecure_channel(ray.get_runtime_context().gcs_address)
    get_nodes = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")
    for token in (None, "0" * 64):
        with pytest.raises(grpc.RpcError) as refused:
            get_nodes(b"", timeout=30, metadata=None if token is None else [("authorization", f"Bearer {token}")])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert get_nodes(b"", timeout=30, metadata=[("authorization", f"Bearer {os.environ['RAY_AUTH_TOKEN']}")])


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too


def test_ray_run_with_plugins(ray_env):
    out = ray_env / "run"
    cfg = load_config(overrides=COMMON + [f"trainer.out_dir={out}",
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
    too_big = load_config(overrides=COMMON + ["ray.learner_num_cpus=2", "ray.rollout_num_cpus=1",
                                              f"trainer.out_dir={ray_env / 'too_big'}"])
    with pytest.raises(ConfigError, match="exceeds the cluster"):
        train(too_big)


def test_gae_with_its_critic_runs_in_actors_as_in_process(ray_env):
    """The critic lives in the learner, so the Ray layout needs nothing more: a gae run (values, returns,
    the critic's update and checkpoint inside the learner actor) logs what the same run logs in process."""
    tiny = ["trainer.total_steps=2", "trainer.test_freq=0", "trainer.save_freq=2", "data.train_batch_size=4",
            "rollout.n=4", "model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
            "trainer.num_threads=1", "algorithm.advantage.estimator=gae", "actor.micro_batch_size=8",
            "data.reward_fn=fused_canon.trainer.tasks:positional_reward"]
    runs = {}
    for layout, enabled in (("actors", "true"), ("process", "false")):
        out = ray_env / f"gae_{layout}"
        train(load_config(overrides=COMMON + tiny + [f"ray.enabled={enabled}", f"trainer.out_dir={out}"]))
        runs[layout] = logged_steps(out)
        assert (out / "checkpoints" / "global_step_2" / "critic_model.pt").is_file()
    assert sorted(runs["actors"]) == [1, 2] and "critic/vf_loss" in runs["actors"][2][0]
    assert runs["actors"] == runs["process"]

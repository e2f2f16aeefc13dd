"""The Ray executor on a two-node cluster on this machine: same results as in-process, clear errors."""

import copy

import pytest
import torch

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import multinet  # noqa: E402
from multinet import Budget, data, zoo  # noqa: E402
from multinet.calib import collect, consumer_specs  # noqa: E402
from multinet.calib.sharded import collect_on  # noqa: E402
from multinet.runtime.executors import ExecutorError, LocalExecutor, RayExecutor  # noqa: E402
from multinet.graph import trace  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """Two nodes with one CPU each (a head, and a 'worker' node that declares one GPU — there is no
    CUDA here, so GPU jobs land there and fall back to the CPU): start-up once for the module."""
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
    c.add_node(num_cpus=1, num_gpus=1, resources={"worker": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def calib():
    return data.load("digits").train_x[:512]


def test_sharded_statistics_equal_in_process_ones(cluster, calib):
    executor = RayExecutor(num_gpus=0)
    assert executor.workers == 2
    graph = trace(zoo.create("resnet"), calib[:1])
    specs = consumer_specs(graph, [n for g in graph.prunable_groups for n in g.consumer_names][:4])
    here = collect(graph.module, specs, calib, batch_size=64, max_positions=16, seed=3)
    there = collect_on(executor, graph.module, specs, calib, batch_size=64, max_positions=16, seed=3)
    assert set(here) == set(there)
    for name in here:
        assert there[name].rows == here[name].rows
        torch.testing.assert_close(there[name].gram, here[name].gram, rtol=1e-10, atol=1e-8)


def test_custom_resources_place_jobs_on_the_worker_node(cluster):
    def node_id(_):  # defined here so that Ray ships it by value (tests/ is not importable on workers)
        import ray as worker_ray

        return worker_ray.get_runtime_context().get_node_id()

    executor = RayExecutor(num_gpus=0, resources={"worker": 1})
    nodes = executor.map(node_id, range(4))
    head = next(n["NodeID"] for n in ray.nodes() if n["Resources"].get("head"))
    assert len(set(nodes)) == 1 and nodes[0] != head


def test_compress_on_ray_equals_in_process(cluster, calib):
    budget = Budget(flops=0.5)
    here = multinet.compress(zoo.create("vgg"), calib, budget=budget, max_positions=16, executor=LocalExecutor())
    there = multinet.compress(zoo.create("vgg"), calib, budget=budget, max_positions=16, executor="ray")
    assert here.plan.removals() == there.plan.removals()
    with torch.no_grad():
        torch.testing.assert_close(there.model(calib[:64]), here.model(calib[:64]), atol=1e-4, rtol=1e-4)


def test_sequential_pipeline_is_data_parallel_on_ray_and_equals_in_process(cluster, calib):
    """Two workers each hold half the batches and their frontier (a residual stream spans segments in
    the zoo ResNet); the driver adds their partial statistics and sends back new weights."""
    here = multinet.compress(zoo.create("resnet"), calib, ratio=0.3, max_positions=16, batch_size=64)
    executor = RayExecutor(num_gpus=0)
    assert executor.workers == 2
    there = multinet.compress(zoo.create("resnet"), calib, ratio=0.3, max_positions=16, batch_size=64,
                              executor=executor)
    assert there.cost is not None and there.cost.passes == pytest.approx(here.cost.passes)  # the pipeline ran
    assert [r.removed for r in there.groups] == [r.removed for r in here.groups]
    with torch.no_grad():
        torch.testing.assert_close(there.model(calib[:64]), here.model(calib[:64]), atol=1e-4, rtol=1e-4)


def test_a_held_executor_reuses_its_shard_actors_and_frees_them_when_dropped(cluster, calib):
    """Two runs on one executor: the second run's shards live in the first run's actors (no process start,
    no torch import again) and give the same result. Kept actors hold their CPUs: another executor's jobs
    must still run (it kills them first), and dropping the executor frees them."""
    import threading
    import time

    from multinet.runtime import executors

    def kept(ex):
        return [a._actor_id.hex() for owner, a in executors._IDLE_SHARDS if owner is ex._token]

    executor = RayExecutor(num_gpus=0)
    run = dict(ratio=0.3, max_positions=16, batch_size=64, executor=executor)
    first = multinet.compress(zoo.create("resnet"), calib, **run)
    actors = kept(executor)
    assert len(actors) == 2 and ray.available_resources().get("CPU", 0) == 0  # kept, holding both CPUs
    second = multinet.compress(zoo.create("resnet"), calib, **run)
    assert kept(executor) == actors  # the same two actors ran it
    assert [r.removed for r in second.groups] == [r.removed for r in first.groups]

    other, got = RayExecutor(num_gpus=0), []
    job = threading.Thread(target=lambda: got.append(other.map(lambda v: -v, [-1, -2])), daemon=True)
    job.start()
    job.join(60)  # would wait forever for the CPUs the kept actors hold
    assert got == [[1, 2]] and kept(executor) == []

    multinet.compress(zoo.create("resnet"), calib, **run)
    before = kept(executor)
    assert len(before) == 2
    ray.kill(next(a for owner, a in executors._IDLE_SHARDS if owner is executor._token))  # a lost worker
    third = multinet.compress(zoo.create("resnet"), calib, **run)  # starts new actors instead of failing
    assert [r.removed for r in third.groups] == [r.removed for r in first.groups]
    assert len(kept(executor)) == 2 and not set(kept(executor)) & set(before)
    del executor, run  # the last references: the executor is collected and kills its kept actors
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_unify_on_ray_equals_in_process_and_frees_the_cluster(cluster, calib):
    """One executor serves all of unify's compressions (their shard actors are reused) and is released
    at the end: the cluster's CPUs are free again."""
    import time

    a = zoo.create("mlp")
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.head.weight.mul_(1.5)  # a second member that is not a plain copy
    here = multinet.unify({"a": a, "b": b}, calib, budget=0.2, max_positions=16)
    there = multinet.unify({"a": a, "b": b}, calib, budget=0.2, max_positions=16, executor="ray")
    assert there.chosen == here.chosen and sorted(map(str, there.model.links)) == sorted(map(str, here.model.links))
    with torch.no_grad():
        for name, out in there.model(calib[:64]).items():
            torch.testing.assert_close(out, here.model(calib[:64])[name], atol=1e-4, rtol=1e-4)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_resources_the_cluster_lacks_fail_at_once(cluster):
    # refused by checking the cluster's resources up front: a Ray task asking for them would wait forever
    with pytest.raises(ExecutorError, match="cannot run these jobs"):
        RayExecutor(num_gpus=2)
    with pytest.raises(ExecutorError, match="cannot run these jobs"):
        RayExecutor(resources={"tpu_pod": 1})


def test_unreachable_address_fails_within_the_timeout():
    """In a fresh process (this one is connected to the test cluster): a clear error, never a hang."""
    import subprocess
    import sys

    code = "from multinet.runtime.executors import RayExecutor; RayExecutor('127.0.0.1:1', connect_timeout=2)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)  # hang guard
    assert result.returncode != 0 and "cannot reach a Ray cluster at 127.0.0.1:1" in result.stderr


def test_the_connect_probe_is_bounded_by_the_timeout(monkeypatch):
    """No clock: the probe hands the timeout to the socket, and a silent address is an error, not a hang."""
    import socket

    from multinet.runtime import executors

    asked = []

    def silent(address, timeout=None):
        asked.append((address, timeout))
        raise socket.timeout("timed out")

    monkeypatch.setattr(executors.socket, "create_connection", silent)
    with pytest.raises(ExecutorError, match="cannot reach a Ray cluster at 127.0.0.1:6399 within 3 s"):
        executors._reachable("127.0.0.1:6399", 3.0)
    assert asked == [(("127.0.0.1", 6399), 3.0)]


def test_bad_executor_names():
    with pytest.raises(ExecutorError, match="unknown executor"):
        multinet.compress(zoo.create("mlp"), torch.zeros(8, 1, 8, 8), executor="spark")


def test_ray_scenario_runs_on_the_cluster(cluster, tmp_path, capsys):
    from pathlib import Path

    from multinet.cli import main

    scenario = Path(__file__).parent.parent / "scenarios" / "ray_quickstart.yaml"
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--set", "data.calibration=256",
                 "--ray-address", cluster.address]) == 0
    assert (out / "resnet.mnet").exists()
    assert "executor: ray" in (out / "scenario.yaml").read_text()


class _DyingOnce(RayExecutor):
    """Every job of the first shard kills its worker process once: Ray must retry it elsewhere."""

    def __init__(self, marker, **kwargs):
        super().__init__(**kwargs)
        self.marker = str(marker)

    def map(self, fn, items):
        marker = self.marker

        def job(item):
            import os

            if item["first_batch"] == 0 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # the worker process dies mid-job
            return fn(item)

        return super().map(job, items)


def test_a_killed_worker_is_retried_and_the_result_is_unchanged(cluster, calib, tmp_path):
    graph = trace(zoo.create("mlp"), calib[:1])
    specs = consumer_specs(graph, [n for g in graph.prunable_groups for n in g.consumer_names])
    here = collect(graph.module, specs, calib, batch_size=64)
    executor = _DyingOnce(tmp_path / "killed", max_retries=2, num_gpus=0)
    there = collect_on(executor, graph.module, specs, calib, batch_size=64)
    assert (tmp_path / "killed").exists()  # a worker did die
    for name in here:
        torch.testing.assert_close(there[name].gram, here[name].gram, rtol=1e-10, atol=1e-8)


def test_batch_inference_of_a_multinet_with_ray_data(cluster, calib):
    pytest.importorskip("ray.data")
    net = multinet.MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, calib[:1])
    here = multinet.infer(net, calib[:300], batch_size=64)
    there = multinet.infer(net, calib[:300], batch_size=64, executor=RayExecutor())  # each actor times overlap
    overlapped = multinet.infer(net, calib[:300], batch_size=64, executor=RayExecutor(), overlap=True)
    assert set(there) == set(overlapped) == {"a", "b"}
    for key in here:  # every image, in order; the actors rebuild the overlapped form where it was chosen
        torch.testing.assert_close(there[key], here[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(overlapped[key], here[key], atol=1e-5, rtol=1e-5)


def test_gpu_jobs_go_to_the_gpu_node_when_the_cluster_has_gpus(cluster, calib):
    executor = RayExecutor()  # num_gpus="auto": the cluster declares a GPU, so every job asks for one
    assert executor.gpu and executor.workers == 1

    def where(_):
        import ray as worker_ray
        import torch as worker_torch

        return worker_ray.get_runtime_context().get_node_id(), worker_ray.get_gpu_ids(), worker_torch.cuda.is_available()

    head = next(n["NodeID"] for n in ray.nodes() if n["Resources"].get("head"))
    for node, gpus, cuda in executor.map(where, range(3)):
        assert node != head and len(gpus) == 1 and not cuda  # placed on the GPU node; no CUDA here: CPU fallback
    graph = trace(zoo.create("mlp"), calib[:1])
    specs = consumer_specs(graph, [n for g in graph.prunable_groups for n in g.consumer_names])
    here = collect(graph.module, specs, calib, batch_size=64)
    there = collect_on(executor, graph.module, specs, calib, batch_size=64)
    for name in here:
        torch.testing.assert_close(there[name].gram, here[name].gram, rtol=1e-10, atol=1e-8)


def test_exhaustive_schedule_evaluates_candidates_on_a_worker_pool(cluster, calib):
    budget = Budget(flops=0.6)
    here = multinet.compress(zoo.create("mlp"), calib, budget=budget, schedule="exhaustive")
    there = multinet.compress(zoo.create("mlp"), calib, budget=budget, schedule="exhaustive",
                              executor=RayExecutor(num_gpus=0))
    assert here.plan.removals() == there.plan.removals()
    assert there.plan.predicted_error == pytest.approx(here.plan.predicted_error, rel=1e-6)


def test_cuda_out_of_memory_falls_back_to_the_cpu():
    """Simulated (no GPU here): the first evaluation runs out of memory, the retry on the CPU succeeds."""
    from multinet.schedule.oneshot import masked_error, masked_sample_errors

    class Evaluator:
        device = "cuda"

        def error(self, removed, samples=None):
            if self.device == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return 0.25

        def to(self, device):
            self.device = device
            return self

        def sample_errors(self, states, start, stop, base=None):
            if self.device == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return [torch.full((stop - start,), 0.5) for _ in states]

    evaluator = Evaluator()
    assert masked_error(evaluator, {0: [1]}) == 0.25 and evaluator.device == "cpu"
    probing = Evaluator()  # an auto schedule's probe, on a sample range
    assert masked_sample_errors(probing, ({0: [1]}, 4, 7, None)).tolist() == [0.5] * 3 and probing.device == "cpu"

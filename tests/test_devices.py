"""Devices and threads mean what they say, and bad ones are refused before any work."""
import pytest
import torch

import multinet
from multinet import Budget, zoo
from multinet.runtime import devices
from multinet.runtime.devices import DeviceError, resolve_device, set_threads

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_default_resolve_to_the_cpu():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name,match", [("tpu", "unknown device"), ("mps", "unsupported device"), ("foo", "unknown device"),
                                        ("", "unknown device"), ("meta", "unsupported device")])
def test_unknown_devices_are_refused_in_one_line(name, match):
    with pytest.raises(DeviceError, match=match) as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_refused(name):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device(name)


def test_a_gpu_named_without_its_index_is_the_current_one(monkeypatch):
    """A parameter on the current GPU reports 'cuda:0'; a run's device given as 'cuda' is that GPU (torch's
    ``==`` says otherwise, and infer's timed fusion used to be skipped there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert devices.same_device("cuda", "cuda:1") and devices.same_device(torch.device("cuda:1"), "cuda")
    assert not devices.same_device("cuda", "cuda:0") and not devices.same_device("cuda:0", "cuda:1")
    assert devices.same_device("cuda", "cuda") and not devices.same_device("cuda", "cpu")
    assert devices.same_device("cpu", torch.device("cpu")) and not devices.same_device("cpu", "meta")


def test_compress_refuses_a_bad_device_before_any_work(monkeypatch):
    import multinet.pipeline.compression as compression

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced before the device was checked")

    monkeypatch.setattr(compression, "trace", no_tracing)
    with pytest.raises(DeviceError):
        multinet.compress(zoo.create("mlp"), torch.randn(8, 1, 8, 8), ratio=0.5, device="tpu")


def test_latency_is_measured_on_the_runs_device_unless_the_budget_names_one(monkeypatch):
    import multinet.pipeline.compression as compression
    import multinet.schedule.scheduler as scheduler

    seen = []

    def fake_ms(model, example, device="cpu", **_):
        seen.append(device)
        return 1.0 + multinet.count(model, example_inputs=(example,)).flops / 1e4

    monkeypatch.setattr(scheduler, "measure_ms", fake_ms)
    monkeypatch.setattr(compression, "measure_ms", fake_ms)
    model, x = zoo.create("mlp"), multinet.data.load("digits").train_x[:256]
    original = fake_ms(multinet.trace(model, x[:1]).module, x[:1])
    result = multinet.compress(model, x, budget=Budget(latency_ms=0.8 * original), eval_samples=64, device="cpu")
    assert Budget(flops=0.5).device is None
    assert result.plan.budget["device"] == "cpu" and set(seen) == {"cpu"}


def test_threads_are_set_and_checked():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        chosen = set_threads(None)
        assert 1 <= chosen <= devices.available_cpus() and torch.get_num_threads() == chosen
        for bad in (0, -2, 1.5, True):
            with pytest.raises(multinet.MultinetError, match="positive integer"):
                set_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(devices, "available_cpus", lambda: 8)
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert devices.default_threads() == 8
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (5.2, 0.0, 0.0))
    assert devices.default_threads() == 3
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert devices.default_threads() == 1


def test_a_ray_predictor_computes_on_the_gpu_it_reserved(monkeypatch):
    ray = pytest.importorskip("ray")
    from multinet.runtime.infer import predictor_device

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert predictor_device() == torch.device("cuda")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert predictor_device() == torch.device("cpu")  # no GPU reserved: never take one
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert predictor_device() == torch.device("cpu")  # reserved but CUDA does not work here


def test_solves_follow_the_problems_device():
    from multinet.solve import ConsumerProblem, reap_greedy_multi
    from multinet.solve.problem import blocked_columns

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 13, generator=gen, dtype=torch.float64)
    problem = ConsumerProblem(x.T @ x, torch.randn(13, 3, generator=gen, dtype=torch.float64), torch.arange(4),
                              blocked_columns(4, 3))
    here = reap_greedy_multi([problem], 4, 2)
    moved = reap_greedy_multi([problem.to("cpu")], 4, 2, pieces=[torch.arange(4)])
    assert here.removed == moved.removed and torch.equal(here.errors, moved.errors)
    assert moved.errors.device.type == "cpu"

import pytest
import torch

from group_checks import check_model, randomize_norm_stats
from multinet import zoo


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_groups_prune_exactly(name, dataset):
    torch.manual_seed(0)
    model = randomize_norm_stats(zoo.build(name, dataset))
    x = torch.randn(3, *zoo.example_input(dataset).shape[1:])
    graph = check_model(model, x, max_channels=1)
    assert len(graph.prunable_groups) == len(graph.groups) - 1  # only the logits are fixed
    assert not graph.groups[-1].prunable and "output" in graph.groups[-1].reasons[0]


def test_resnet_residual_stream_is_one_group():
    graph = multinet_trace("resnet")
    stream = graph.group_of_layer("stem.0")
    assert set(stream.producers) == {"stem.0", "blocks.0.conv2.0", "blocks.1.conv2.0"}
    assert "blocks.2.downsample.0" in stream.consumer_names and "blocks.2.conv1.0" in stream.consumer_names
    stage2 = graph.group_of_layer("blocks.2.downsample.0")
    assert set(stage2.producers) == {"blocks.2.downsample.0", "blocks.2.conv2.0", "blocks.3.conv2.0"}


def test_mobilenet_squeeze_excite_ties_gate_to_features():
    graph = multinet_trace("mobilenet")
    group = graph.group_of_layer("blocks.3.expand.0")
    assert "blocks.3.se.fc2" in group.producers
    assert {"blocks.3.se.fc1", "blocks.3.project.0"} <= set(group.consumer_names)
    assert "blocks.3.depthwise.0" in group.passthrough


def test_densenet_concat_offsets_reach_consumers():
    graph = multinet_trace("densenet")
    stem = graph.group_of_layer("stem.0")
    # the stem's 24 channels enter every later dense layer of block 1 at positions 0..23
    slots = [s for s in stem.consumers if s.consumer == "block1.2.conv"]
    assert len(slots) == 1 and slots[0].positions.tolist() == list(range(24))
    second = graph.group_of_layer("block1.1.conv")
    slots = [s for s in second.consumers if s.consumer == "transition.2"]
    assert slots[0].positions.tolist() == list(range(24 + 12, 24 + 24))


def test_flatten_to_linear_blocks():
    graph = multinet_trace("vgg", "mnist")
    last_conv = graph.group_of_layer("features.4.0")
    (slot,) = last_conv.consumers
    assert slot.consumer == "classifier.0" and slot.block == 7 * 7
    assert slot.positions[:3].tolist() == [0, 49, 98]


def multinet_trace(name, dataset="digits"):
    import multinet

    return multinet.trace(zoo.build(name, dataset), zoo.example_input(dataset))


@pytest.mark.parametrize("name", zoo.names())
def test_checkpoints_reproduce_recorded_accuracy(name):
    from multinet import data

    split = data.load("digits")
    acc = data.accuracy(zoo.create(name), split.test_x, split.test_y)
    assert acc == pytest.approx(zoo.recorded_accuracy("digits")[name], abs=1e-4)
    assert acc > 0.95


def test_tracing_records_fx_s_shapes_without_importing_sympy():
    """Each node's tensor_meta carries fx ShapeProp's shape, dtype and strides, recorded without its
    memory-format probe, whose first call imports sympy (~0.4 s in every fresh process)."""
    import subprocess
    import sys

    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    from multinet.graph.tracing import tensor_metadata

    for t in (torch.randn(2, 3, 4, 5), torch.randn(4, 6).T, torch.zeros(3, dtype=torch.int64)):
        ours, fx_s = tensor_metadata(t), _extract_tensor_metadata(t)
        assert (ours.shape, ours.dtype, ours.stride, ours.requires_grad) == (fx_s.shape, fx_s.dtype, fx_s.stride,
                                                                             fx_s.requires_grad)
    script = ("import sys, torch, multinet\n"
              "from multinet import zoo\n"
              "multinet.trace(zoo.create('resnet'), torch.zeros(1, 1, 8, 8))\n"
              "print('sympy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

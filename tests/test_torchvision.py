"""The foundation checks on real torchvision architectures (random weights).

Slow and needs torchvision (its own environment here, see benchmarks/torchvision_zoo.py):
    .venv-tv/bin/python -m pytest -m slow tests/test_torchvision.py
"""
import pytest
import torch

import multinet

from group_checks import check_model, randomize_norm_stats

tvm = pytest.importorskip("torchvision.models")

MODELS = {
    "resnet18": 64, "resnext50_32x4d": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64, "efficientnet_b0": 64,
    "convnext_tiny": 64, "googlenet": 64, "inception_v3": 96, "squeezenet1_1": 64,
    "shufflenet_v2_x0_5": 64, "regnet_y_400mf": 64, "mnasnet0_5": 64, "vgg11_bn": 64, "vit_b_16": 224,
    "maxvit_t": 224,  # packed q/k/v, einsum attention, relative position bias table (about 6 min on one thread)
    "swin_t": 224,  # an fx-wrapped window attention: captured with torch.export (pad, roll, indexed q/k/v, mask)
    "swin_v2_t": 224,  # and a patched qkv bias, cosine attention, an MLP position bias gathered by index
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchvision_groups_prune_exactly(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    model = randomize_norm_stats(tvm.get_model(name, weights=None, **kwargs))
    side = MODELS[name]
    graph = check_model(model, torch.randn(2, 3, side, side), max_channels=1)
    assert graph.prunable_groups


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_heads_are_prunable(name):
    """fx records torchvision's shifted_window_attention as one call; auto capture falls back to
    torch.export, where every block's heads and every stage's width are groups."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = multinet.trace(tvm.get_model(name, weights=None).eval(), torch.randn(1, 3, 224, 224))
    heads = [g for g in graph.groups if g.attention_heads]
    assert len(heads) == 12 and all(g.prunable for g in heads)
    assert [g.size for g in heads] == [3, 3, 6, 6, 12, 12, 12, 12, 12, 12, 24, 24]
    assert len(graph.prunable_groups) == len(graph.groups) - 1  # all but the logits


@pytest.mark.slow
def test_segmentation_models_prune_exactly():
    """LR-ASPP (a segmentation head reading two backbone stages, bilinear upsampling to the input size)."""
    torch.manual_seed(0)
    model = randomize_norm_stats(tvm.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None))
    graph = check_model(model, torch.randn(2, 3, 64, 64), max_channels=1)
    assert len(graph.prunable_groups) == len(graph.groups) - 1  # all but the logits


@pytest.mark.slow
def test_a_detector_backbone_compresses_as_a_submodule():
    """A detector does not trace whole (anchors, NMS); its backbone + FPN is compressed on what the detector
    feeds it, and the detector runs with it in place, its FPN levels unchanged in shape."""
    torch.manual_seed(0)
    detector = tvm.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None).eval()
    images = torch.rand(8, 3, 160, 200)
    with pytest.raises(multinet.MultinetError):
        multinet.trace(detector, images[:1])
    result = multinet.compress(detector, images, ratio=0.3, batch_size=4, max_positions=16, submodule="backbone")
    assert result.flops_after < 0.7 * result.flops_before
    assert result.whole_model.backbone.out_channels == detector.backbone.out_channels
    x = detector.transform(list(images[:2]))[0].tensors
    with torch.no_grad():
        before, after = detector.backbone(x), result.model(x)
        assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
        detections = result.whole_model(images[:2])
    assert [sorted(d) for d in detections] == [["boxes", "labels", "scores"]] * 2

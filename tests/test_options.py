"""RunOptions: one typed, checked home for the settings a run threads through every stage."""

import pytest
import torch

import multinet
from multinet import MultinetError, RunOptions, data, zoo


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(max_positions=0), dict(damp=-1.0), dict(damp=float("nan")),
                                 dict(eval_samples=0), dict(frontier_memory=-1), dict(frontier_memory="lots"),
                                 dict(frontier_dtype="int8")])
def test_bad_settings_are_refused_with_their_name(bad):
    with pytest.raises(MultinetError, match=next(iter(bad))):
        RunOptions(**bad)


def test_an_unknown_device_is_refused_when_resolved():
    with pytest.raises(MultinetError):
        RunOptions(device="tpu").resolved()


def test_compress_with_options_equals_compress_with_keywords():
    x = data.load("digits").train_x[:256]
    opts = RunOptions(batch_size=64, max_positions=16, seed=3, eval_samples=128)
    by_options = multinet.compress(zoo.create("vgg"), x, ratio=0.4, options=opts)
    by_keywords = multinet.compress(zoo.create("vgg"), x, ratio=0.4, batch_size=64, max_positions=16, seed=3,
                                    eval_samples=128)
    assert [g.removed for g in by_options.groups] == [g.removed for g in by_keywords.groups]
    with torch.no_grad():
        torch.testing.assert_close(by_options.model(x[:32]), by_keywords.model(x[:32]))


def test_options_and_a_differing_keyword_at_once_are_ambiguous():
    x = data.load("digits").train_x[:64]
    with pytest.raises(MultinetError, match="max_positions"):
        multinet.compress(zoo.create("mlp"), x, ratio=0.5, options=RunOptions(), max_positions=8)


def test_every_front_end_shares_the_library_default_for_sampled_positions():
    from multinet.cli import build_parser
    from multinet.scenario.schema import CompressStep, UnifyStep

    assert CompressStep(ratio=0.5).max_positions == RunOptions.max_positions
    assert UnifyStep(budget={"flops": 0.5}).max_positions == RunOptions.max_positions
    args = build_parser().parse_args(["compress", "zoo:mlp", "--ratio", "0.5"])
    assert args.max_positions == RunOptions.max_positions


def test_a_keyword_that_repeats_the_options_own_value_is_not_ambiguous():
    """A caller that read its settings from ``options`` may pass them on beside it (unify does)."""
    opts = RunOptions(batch_size=64, eval_samples=128)
    assert RunOptions.of(opts, batch_size=64, eval_samples=128) is opts
    with pytest.raises(MultinetError, match="batch_size"):
        RunOptions.of(opts, batch_size=32)

"""Overlapped MultiNets: the members' own parts run at the same time (worker threads on a CPU) and give
the outputs of the graph run in one thread, bit for bit."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

import multinet
from multinet import MultiNet, data, zoo
from multinet.io import load, save
from multinet.unification.overlap import OverlapPlan, members_reached


@pytest.fixture(scope="module")
def split():
    return data.load("digits")


def _equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pieces_follow_the_members_each_node_reaches(split):
    """Fused, two MLPs share their first layer: a piece reaching both, then one piece per member that
    reads only it; every node of a piece reaches exactly its members."""
    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("mlp")}, split.train_x[:1]).fused()
    plan = OverlapPlan(net.graph_module)
    assert [set(p.members) for p in plan.pieces] == [{"a", "b"}, {"a"}, {"b"}]
    assert plan.pieces[0].needs == [] and plan.pieces[1].needs == [0] and plan.pieces[2].needs == [0]
    assert plan.concurrent()
    reached = members_reached(net.graph_module)
    shared = [n.target for n, m in reached.items() if m == frozenset("ab") and n.op == "call_module"]
    assert any(t.startswith("fused_") for t in shared)  # the two first layers, one wider layer
    gm = net.graph_module
    assert not any(isinstance(gm.get_submodule(t), nn.Linear) for t in shared if not t.startswith("fused_"))


@pytest.mark.parametrize("kinds", [("mlp", "vgg"), ("vgg", "resnet", "mlp")], ids=["mlp+vgg", "vgg+resnet+mlp"])
def test_overlapped_outputs_equal_the_graph_run_in_one_thread(split, kinds):
    models = {f"{k}{i}": zoo.create(k).eval() for i, k in enumerate(kinds)}
    net = MultiNet(models, split.train_x[:1]).eval()
    x = split.test_x[:40]
    with torch.no_grad():
        plain = net(x)
        _equal(net.overlapped()(x), plain)
        _equal(net.fused().overlapped()(x), net.fused()(x))
        _equal(net.overlapped().fused()(x), net.fused()(x))  # either order of the two forms
        for name, model in models.items():
            torch.testing.assert_close(plain[name], model(x))
    assert net.overlapped().is_overlapped and not net.is_overlapped
    assert net.overlapped().fused().is_overlapped and not net.overlapped().overlapped(False).is_overlapped


def test_the_callers_grad_mode_reaches_the_worker_threads(split):
    """torch keeps grad and inference mode per thread: under no_grad no member builds an autograd graph,
    and with gradients on, backward through the overlapped net gives the one-thread gradients."""
    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, split.train_x[:1]).eval()
    fast = net.overlapped()
    x = split.test_x[:16]
    with torch.no_grad():
        assert not any(t.requires_grad for t in fast(x).values())
    with torch.inference_mode():
        assert all(t.is_inference() for t in fast(x).values())
    grads = []
    for form in (net, fast):
        form.zero_grad()
        sum(o.square().sum() for o in form(x).values()).backward()
        grads.append({n: p.grad.clone() for n, p in form.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


def test_one_member_or_a_chain_has_nothing_to_overlap(split):
    net = MultiNet({"a": zoo.create("mlp")}, split.train_x[:1]).eval()
    assert not net.can_overlap()
    with torch.no_grad():
        _equal(net.overlapped()(split.test_x[:8]), net(split.test_x[:8]))


def test_a_layer_replaced_after_the_cut_is_the_one_that_runs(split):
    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, split.train_x[:1]).eval()
    fast = net.overlapped()
    x = split.test_x[:8]
    with torch.no_grad():
        before = fast(x)  # the pieces are cut now
        net.graph_module.a.head = nn.Linear(64, 10)
        after = fast(x)
        assert not torch.equal(after["a"], before["a"]) and torch.equal(after["b"], before["b"])
        _equal(after, net(x))


class _Scaled(nn.Module):
    """A member with two named inputs (the second optional in the merged graph's binding)."""

    def __init__(self, scale: float):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.scale = scale

    def forward(self, x, mask):
        return self.fc(x * mask) * self.scale


def test_named_inputs_bind_as_in_the_graphs_own_forward():
    torch.manual_seed(0)
    x, mask = torch.randn(5, 8), (torch.rand(5, 8) > 0.3).float()
    net = MultiNet({"a": _Scaled(1.0), "b": _Scaled(2.0)}, {"x": x[:1], "mask": mask[:1]}).eval()
    fast = net.overlapped()
    with torch.no_grad():
        want = net(x=x, mask=mask)
        _equal(fast(x=x, mask=mask), want)
        _equal(fast(x, mask), want)
        _equal(fast(x, mask=mask), want)
        with pytest.raises(TypeError, match="missing input 'mask'"):
            fast(x)
        with pytest.raises(TypeError, match="unexpected inputs"):
            fast(x, mask, extra=mask)


def test_an_error_in_a_member_reaches_the_caller_and_the_net_still_runs(split):
    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, split.train_x[:1]).eval().overlapped()
    with torch.no_grad(), pytest.raises(RuntimeError):
        net(torch.zeros(4, 1, 5, 5))  # neither member takes 5x5 images
    with torch.no_grad():
        assert net(split.test_x[:4])["a"].shape == (4, 10)


def test_copies_keep_the_overlap_and_a_saved_file_holds_the_same_graph(split, tmp_path):
    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, split.train_x[:1]).eval()
    fast = net.overlapped()
    x = split.test_x[:8]
    with torch.no_grad():
        want = net(x)
        for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert copied.is_overlapped and not any(m.training for m in copied.modules())  # still in eval mode
            _equal(copied(x), want)
        path = save(fast, tmp_path / "pair.mnet", split.train_x[:1])
        loaded = load(path)  # overlap is a run-time choice: the file holds the graph
        assert isinstance(loaded, MultiNet) and not loaded.is_overlapped
        _equal(loaded.overlapped()(x), want)


def test_infer_overlaps_where_asked_and_where_it_is_faster(split):
    from multinet.runtime.infer import faster_overlap

    models = {"a": zoo.create("mlp"), "b": zoo.create("vgg")}
    net = MultiNet(models, split.train_x[:1])
    x = split.test_x[:100]
    with torch.no_grad():
        want = {name: torch.cat([m.eval()(x[i:i + 32]) for i in range(0, 100, 32)]) for name, m in models.items()}
    for overlap in (True, False, "auto"):
        out = multinet.infer(net, x, batch_size=32, fuse=False, overlap=overlap)
        _equal(out, want)
    with pytest.raises(multinet.MultinetError, match="overlap must be True, False or 'auto'"):
        multinet.infer(net, x, overlap="yes")

    for costs, chosen in (((1.0, 0.5), True), ((0.5, 1.0), False)):
        clock, _ = _charging_clock([costs] * 50)
        form = faster_overlap(net, x[:32], torch.device("cpu"), trials=3, clock=clock)
        assert form.is_overlapped == chosen
    plain = zoo.create("mlp")
    assert faster_overlap(plain, x[:32], torch.device("cpu")) is plain  # not a MultiNet: nothing timed
    single = MultiNet({"a": zoo.create("mlp")}, split.train_x[:1])
    assert faster_overlap(single, x[:32], torch.device("cpu"), clock=_no_clock) is single


def _no_clock():
    raise AssertionError("nothing should be timed")


def test_cli_infer_overlaps(split, tmp_path, capsys):
    from multinet.cli import main

    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, split.train_x[:1])
    path = save(net, tmp_path / "pair.mnet", split.train_x[:1])
    assert main(["infer", str(path), "--overlap", "yes", "--quiet"]) == 0
    assert "a: accuracy" in capsys.readouterr().out


def test_the_caller_runs_the_trunk_and_the_heaviest_piece_it_can_run_beside_others():
    from types import SimpleNamespace

    from multinet.unification.overlap import _thread_order

    # a trunk every member reads, then three member pieces that can run at the same time; the second is heaviest
    plan = SimpleNamespace(pieces=[None] * 4, work=[10, 50, 200, 5], partnered=lambda: [False, True, True, True])
    assert _thread_order(plan) == [(0, True), (1, False), (3, False), (2, True)]


@pytest.mark.parametrize("workers", [1, 3])
def test_no_number_of_workers_deadlocks(split, workers):
    """With one worker, pieces handed to the pool wait for the caller's piece and for each other in turn."""
    from multinet.unification.overlap import OverlappedRun

    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("mlp"), "c": zoo.create("vgg")}, split.train_x[:1])
    fused = net.eval().fused()
    run = OverlappedRun(OverlapPlan(fused.graph_module), workers=workers)
    assert any(not inline for _, inline in run.order)
    with torch.no_grad():
        _equal(run(fused.graph_module, split.test_x[:16]), fused(split.test_x[:16]))


class _InPlace(nn.Module):
    """Statement-form in-place ops: their nodes have no users, so no member's output 'reaches' them."""

    def __init__(self, shared_input: bool = False):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.shared_input = shared_input

    def forward(self, x):
        if self.shared_input:
            torch.relu_(x)  # writes the tensor every member reads
        h = self.fc(x.flatten(1))
        h.relu_()
        h.masked_fill_(h > 1.0, 1.0)
        return h


@pytest.mark.parametrize("shared_input", [False, True], ids=["own tensors", "the shared input"])
def test_a_graph_that_writes_in_place_runs_in_graph_order(split, shared_input):
    models = {"a": _InPlace(shared_input), "b": zoo.create("mlp")}
    net = MultiNet(models, split.train_x[:1]).eval()
    assert not net.can_overlap()
    x = split.test_x[:16] - 0.5
    with torch.no_grad():
        want = {"a": models["a"](x.clone()), "b": models["b"](torch.relu(x) if shared_input else x)}
        for form in (net, net.overlapped()):
            got = form(x.clone())
            torch.testing.assert_close(got["a"], want["a"])
            torch.testing.assert_close(got["b"], want["b"])


def test_training_mode_and_per_thread_torch_state_run_in_one_thread(split):
    """Overlap is for inference: in training mode, and under modes torch keeps per thread (a flop
    counter, saved-tensor hooks), the overlapped net runs its graph as written."""
    from torch.utils.flop_counter import FlopCounterMode

    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, split.train_x[:1]).eval()
    fast = net.overlapped()
    run, gm, x = fast._overlapped_run(), fast.graph_module, split.test_x[:8]
    assert run.where_to_run(gm, (x,), {}) == "threads"
    counted = []
    for form in (net, fast):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            form(x)
        counted.append(counter.get_total_flops())
    assert counted[0] == counted[1] > 0  # every member's ops seen by the counter
    with torch.autograd.graph.save_on_cpu():
        assert run.where_to_run(gm, (x,), {}) is None
    fast.train()
    assert net.graph_module.training and run.where_to_run(gm, (x,), {}) is None
    fast.eval()


def test_unify_results_keep_their_layers_mode_when_copied(split):
    from multinet.unification.multinet import combine

    parts = [MultiNet({name: zoo.create("mlp")}, split.train_x[:1]).eval() for name in "ab"]
    joined = combine(parts, ["a", "b"])
    assert not joined.training and not any(m.training for m in copy.deepcopy(joined).modules())


def test_infer_reads_a_one_shot_iterable_once(split):
    """A generator of batches loses none to the overlap timing (nor to fuse="auto"), for a MultiNet and
    for a plain model, which is not timed at all."""
    x = split.test_x[:90]
    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, split.train_x[:1]).eval()
    for model in (net, zoo.create("mlp").eval()):
        for fuse in (True, "auto"):
            out = multinet.infer(model, (x[i:i + 32] for i in range(0, 90, 32)), batch_size=32, fuse=fuse)
            rows = {k: len(v) for k, v in out.items()} if isinstance(out, dict) else len(out)
            assert rows == ({"a": 90, "b": 90} if model is net else 90)
    with pytest.raises(multinet.MultinetError, match="overlap must be True, False or 'auto'"):
        multinet.infer(net, x, overlap=1)
    with pytest.raises(multinet.MultinetError, match="no batch"):
        multinet.infer(net, iter([]), fuse="auto")


@pytest.mark.parametrize("failing, order", [(0, None), (1, None), (2, None), (3, None),
                                            (0, [(1, False), (2, False), (0, True), (3, False)])],
                         ids=["trunk", "member a", "member b", "the caller's", "the caller's, read by workers"])
def test_an_error_in_any_piece_returns_and_leaves_nothing_running(split, failing, order):
    """Whichever piece fails (the caller's or a worker's, before or after others were handed out, one
    that workers wait for), the error reaches the caller without hanging, and the next call runs."""
    from multinet.unification.overlap import OverlappedRun

    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("mlp"), "c": zoo.create("vgg")}, split.train_x[:1])
    fused = net.eval().fused()
    run = OverlappedRun(OverlapPlan(fused.graph_module), workers=1)
    if order is not None:  # the trunk {a, b} on the caller after its readers were handed out
        run.order = order
    piece = run.plan.pieces[failing]
    healthy = piece.forward

    def broken(gm, *args):
        raise ValueError(f"piece {failing} failed")

    piece.forward = broken
    with torch.no_grad(), pytest.raises(ValueError, match=f"piece {failing} failed"):
        run(fused.graph_module, split.test_x[:8])
    piece.forward = healthy
    with torch.no_grad():
        _equal(run(fused.graph_module, split.test_x[:8]), fused(split.test_x[:8]))


def _charging_clock(per_round: list[tuple[float, ...]]):
    """A clock that charges the k-th timed call of each round its form's cost in that round; counts calls.
    Each timed call reads it twice: before, and after (+ the cost)."""
    charges = iter([c for round_ in per_round for c in round_])
    now = {"t": 0.0, "started": False, "calls": 0}

    def clock():
        if now["started"]:
            now["t"] += next(charges)
            now["calls"] += 1
        now["started"] = not now["started"]
        return now["t"]
    return clock, now


@pytest.mark.parametrize("rounds, calls, overlapped", [
    ([(1.0, 0.5)] * 5, 6, True),  # separated after 3 rounds: the last 2 cannot change the medians' order
    ([(0.5, 1.0)] * 5, 6, False),
    ([(1.0, 2.0), (3.0, 2.0), (1.0, 2.0), (3.0, 2.0), (1.0, 2.0)], 10, False),  # interleaved: all 5 rounds
], ids=["overlap clearly faster", "plain clearly faster", "interleaved"])
def test_timing_stops_once_the_answer_is_certain(split, rounds, calls, overlapped):
    from multinet.runtime.infer import faster_overlap

    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, split.train_x[:1])
    clock, now = _charging_clock(rounds)
    form = faster_overlap(net, split.test_x[:32], torch.device("cpu"), trials=5, clock=clock)
    assert form.is_overlapped == overlapped and now["calls"] == calls


def test_an_early_answer_is_the_one_all_rounds_would_give():
    """Brute force: whenever the rounds stop early, every way the remaining rounds could go gives the same
    form the least median (ties are measure-zero with continuous times)."""
    import random
    import statistics

    from multinet.runtime.infer import _decided

    rng = random.Random(0)
    stopped = 0
    for _ in range(2000):
        trials, n_forms = rng.randint(1, 7), rng.randint(2, 3)
        spread = rng.choice([0.1, 1.0])
        full = [[1.0 + 0.2 * f + rng.gauss(0, spread) for _ in range(trials)] for f in range(n_forms)]
        for r in range(1, trials + 1):
            prefix = [t[:r] for t in full]
            if _decided(prefix, trials):
                stopped += r < trials
                early = min(range(n_forms), key=lambda i: max(prefix[i]))
                for _ in range(20):  # any continuation of the remaining rounds
                    rest = [p + [rng.uniform(-5, 5) for _ in range(trials - r)] for p in prefix]
                    medians = [statistics.median(t) for t in rest]
                    assert min(range(n_forms), key=medians.__getitem__) == early
                break
    assert stopped > 100  # the early stop does happen

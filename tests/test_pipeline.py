"""The cached-input pipeline: the same problems, kept channels and model as the full-pass reference path."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import multinet
from multinet import data, zoo
from multinet.calib.frontier import ActivationStore, GraphRunner

pytestmark = pytest.mark.usefixtures("quiet_calibration")


@pytest.fixture(scope="module")
def calib():
    return data.load("digits").train_x[:256]


def _compress(model, x, **kwargs):
    return multinet.compress(model, x, max_positions=16, **kwargs)


def _same(a, b, x, atol=1e-3):
    """Same groups, same channels kept, same costs; outputs equal up to float32 rounding (the full-width
    model adds zero-weight columns, so its sums round differently and the least-squares solves see
    statistics that differ in the last bits)."""
    assert [g.group for g in a.groups] == [g.group for g in b.groups]
    assert [g.removed for g in a.groups] == [g.removed for g in b.groups]  # same channels kept
    assert a.flops_after == b.flops_after and a.params_after == b.params_after
    with torch.no_grad():
        torch.testing.assert_close(a.model(x), b.model(x), atol=atol, rtol=atol)


@pytest.mark.parametrize("training", [False, True])
def test_compression_leaves_the_users_model_as_it_was(training, calib):
    """The pipeline runs the original model as it is where that cannot change it (eval mode, on the
    device) and a copy otherwise: a model in training mode would update its BatchNorm statistics."""
    model = zoo.create("resnet").train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    result = _compress(model, calib, ratio=0.5)
    assert sum(g.channels_before - g.channels_after for g in result.groups) > 0
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet", "mobilenet", "densenet"])
def test_pipeline_equals_the_full_pass_reference_on_the_zoo(name, calib):
    reference = _compress(zoo.create(name), calib, ratio=0.5, mode="reference")
    pipeline = _compress(zoo.create(name), calib, ratio=0.5)
    _same(pipeline, reference, calib[:64])
    assert pipeline.cost is not None and reference.cost is None


class Stage(nn.Module):
    """A residual stream read by three blocks and a head: its readers span every other group's layers."""

    def __init__(self, width=12, hidden=10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(width, hidden, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(hidden, width, 3, padding=1)) for _ in range(3))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(torch.relu(h))
        return self.head(h.mean((2, 3)))


def test_a_residual_stream_spanning_segments_equals_the_reference(calib):
    torch.manual_seed(0)
    model = Stage().eval()
    graph = multinet.trace(model, calib[:1])
    stream = graph.group_of_layer("stem")
    assert stream.prunable and len(stream.consumer_names) == 4  # three blocks and the head read it
    ratios = {g.id: 0.4 for g in graph.prunable_groups}
    reference = _compress(model, calib, ratio=ratios, mode="reference")
    pipeline = _compress(model, calib, ratio=ratios)
    _same(pipeline, reference, calib[:64])
    # the original model runs exactly once: its frontier only moves forward and keeps, as it passes the
    # stream's stage, the inputs the blocks' own groups read later; the compressed model re-runs the stage
    # once for the stream's statistics, without the layers whose inputs are all that run wants
    assert pipeline.cost.original_nodes == pipeline.cost.nodes - 1  # every node but the input placeholder
    assert pipeline.cost.compressed_nodes < 2 * pipeline.cost.nodes


def _kept_forms(model: nn.Module, calib, monkeypatch) -> list[tuple[str, str, str, float]]:
    """Compress ``model`` through the pipeline and the reference path (same result asserted) and return, for
    every value the original's frontier kept for a later group: (layer kind, read kind, form, its size as a
    share of the value)."""
    from multinet.pipeline.frontier_shard import FrontierShard

    forms = []
    kept_form = FrontierShard._kept_form

    def spy(self, read, value, b):
        form, kept = kept_form(self, read, value, b)
        forms.append((read.spec.kind, read.kind, form, kept.numel() / value.numel()))
        return form, kept

    monkeypatch.setattr(FrontierShard, "_kept_form", spy)
    ratios = {g.id: 0.4 for g in multinet.trace(model, calib[:1]).prunable_groups}
    reference = multinet.compress(model, calib, ratio=ratios, mode="reference", max_positions=4)
    pipeline = multinet.compress(model, calib, ratio=ratios, max_positions=4)
    _same(pipeline, reference, calib[:64])
    return forms


def test_values_kept_for_later_groups_as_their_sampled_rows_give_the_reference_result(calib, monkeypatch):
    """What the original's frontier passes for later groups is kept as the rows their statistics will
    sample (a fraction of the activations at few positions per image), and the result does not change."""
    torch.manual_seed(0)
    forms = _kept_forms(Stage().eval(), calib, monkeypatch)
    rows = [(kind, share) for _, kind, form, share in forms if form == "rows"]
    assert {kind for kind, _ in rows} == {"in", "out"}  # block inputs and the stream's values for the drift
    assert all(share < 1 for _, share in rows)
    assert max(share for kind, share in rows if kind == "out") == pytest.approx(4 / 64)


class ChannelsLastStage(nn.Module):
    """ConvNeXt's pattern: a stream read by blocks whose pointwise Linear layers see the grid channels-last."""

    def __init__(self, width=12, hidden=24):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.ups = nn.ModuleList(nn.Linear(width, hidden) for _ in range(3))
        self.downs = nn.ModuleList(nn.Linear(hidden, width) for _ in range(3))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.stem(x)
        for up, down in zip(self.ups, self.downs):
            h = h + down(torch.relu(up(h.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return self.head(h.mean((2, 3)))


def test_channels_last_values_kept_for_later_groups_are_their_sampled_rows(calib, monkeypatch):
    """A Linear reading an image grid channels-last samples its positions as a conv does, so what the
    original's frontier keeps for it (the stream's run passes every block) is those rows too: a fraction
    of the grid. The result is the reference's."""
    torch.manual_seed(0)
    forms = _kept_forms(ChannelsLastStage().eval(), calib, monkeypatch)
    linear = [(form, share) for layer, _, form, share in forms if layer == "linear"]
    assert linear and all(form == "rows" and share < 0.2 for form, share in linear)  # 4 of 64 positions, + ones


def test_spilled_and_half_precision_frontiers(calib):
    in_memory = _compress(zoo.create("vgg"), calib, ratio=0.5)
    spilled = _compress(zoo.create("vgg"), calib, ratio=0.5, frontier_memory=0)
    _same(spilled, in_memory, calib[:64], atol=0)
    assert spilled.cost.spilled > 0 and in_memory.cost.spilled == 0
    # a frontier is written to disk only when it moves: per batch, both once at the inputs, then the compressed
    # model's once per group plus its first move, the original's once per group (a chain: it keeps nothing)
    groups, n_batches = len(spilled.groups), -(-len(calib) // 128)
    assert spilled.cost.spilled == n_batches * (2 + (groups + 1) + groups)
    half = _compress(zoo.create("vgg"), calib, ratio=0.5, frontier_dtype="bfloat16")
    split = data.load("digits")
    accuracy = [data.accuracy(r.model, split.test_x, split.test_y) for r in (in_memory, half)]
    assert abs(accuracy[0] - accuracy[1]) <= 0.02  # measured in benchmarks/frontier_dtype.py; here: it runs and stays close


def test_values_kept_for_later_groups_are_written_once_and_dropped_without_rewriting_the_rest(calib, monkeypatch):
    """The Stage's stream spans every block: the original's frontier passes all the blocks' inputs in the
    stream's run and keeps them for their groups. Spilled, each is written once and deleted when its
    group has read it (a per-batch file rewritten at every drop wrote ViT-B/16's ~39 GB 25 times); the
    result is that of the in-memory run."""
    from multinet.calib.frontier import KeptValues

    added, dropped = [], []
    add, drop = KeptValues.add, KeptValues.drop

    def spy_add(self, batch, key, value):
        added.append((batch, key))
        return add(self, batch, key, value)

    def spy_drop(self, batch, keys):
        keys = list(keys)
        dropped.extend((batch, k) for k in keys)
        return drop(self, batch, keys)

    monkeypatch.setattr(KeptValues, "add", spy_add)
    monkeypatch.setattr(KeptValues, "drop", spy_drop)
    torch.manual_seed(0)
    model = Stage().eval()
    ratios = {g.id: 0.4 for g in multinet.trace(model, calib[:1]).prunable_groups}
    in_memory = _compress(model, calib, ratio=ratios)
    in_memory_added = len(added)
    spilled = _compress(model, calib, ratio=ratios, frontier_memory=0)
    _same(spilled, in_memory, calib[:64], atol=0)
    writes = added[in_memory_added:]
    assert writes and len(writes) == len(set(writes)) == in_memory_added  # every kept value once, both runs
    assert set(writes) <= set(dropped)  # and each deleted once read


def test_kept_values_drop_deletes_one_file_and_leaves_the_others(tmp_path):
    from multinet.calib.frontier import KeptValues

    kept = KeptValues(ActivationStore(0, None, tmp_path))  # no memory: every value in its own file
    a, b = torch.randn(3, 4), torch.randn(5)
    kept.add(0, "a", a)
    kept.add(0, "b", b)
    kept.add(1, "a", a + 1)
    files = sorted(p for d in tmp_path.iterdir() for p in d.iterdir())
    assert len(files) == 3 and kept.spilled == 3 and kept.keys(0) == {"a", "b"}
    stamps = {p: p.stat().st_mtime_ns for p in files}
    kept.drop(0, ["a"])
    left = sorted(p for d in tmp_path.iterdir() for p in d.iterdir())
    assert len(left) == 2 and all(p.stat().st_mtime_ns == stamps[p] for p in left) and kept.spilled == 3
    assert kept.keys(0) == {"b"} and kept.get(0, "a") is None
    torch.testing.assert_close(kept.get(0, "b"), b, atol=0, rtol=0)
    torch.testing.assert_close(kept.get(1, "a"), a + 1, atol=0, rtol=0)
    kept.close()
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_spilling_says_what_to_do(tmp_path, monkeypatch):
    def full(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    store = ActivationStore(0, None, tmp_path)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(multinet.MultinetError, match="could not spill .*frontier_memory.*bfloat16") as err:
        store.put(0, {"x": torch.zeros(1000)})
    assert "No space left on device" in str(err.value) and str(tmp_path) in str(err.value)
    assert not [p for d in tmp_path.iterdir() for p in d.iterdir()]  # no half-written file left behind
    store.close()


def test_budgets_and_plans_run_through_the_pipeline(calib):
    budget = multinet.Budget(flops=0.5)
    pipeline = _compress(zoo.create("resnet"), calib, budget=budget)
    reference = _compress(zoo.create("resnet"), calib, budget=budget, mode="reference")
    _same(pipeline, reference, calib[:64])
    assert pipeline.plan.measured_error == pytest.approx(reference.plan.measured_error, rel=1e-3, abs=1e-6)


def test_a_shard_s_stores_share_one_memory_budget(tmp_path):
    from multinet.calib.frontier import MemoryBudget, frontier_budget

    budget = MemoryBudget(100)
    first, second = ActivationStore(budget, None, tmp_path), ActivationStore(budget, None, tmp_path)
    first.put(0, {"x": torch.zeros(20)})  # 80 bytes: in memory
    second.put(0, {"x": torch.zeros(20)})  # would make 160: spilled
    assert (first.spilled, second.spilled, budget.used) == (0, 1, 80)
    first.discard(0)
    second.put(1, {"x": torch.zeros(20)})  # room again
    assert (second.spilled, budget.used) == (1, 80)
    second.close()
    assert budget.used == 0
    auto = frontier_budget("auto", shards=2)
    assert auto.limit is None or 0 < auto.limit
    assert frontier_budget(None).limit is None and frontier_budget(5).limit == 5


def test_activation_store_round_trips_in_memory_on_disk_and_in_half_precision(tmp_path):
    env = {"x": torch.randn(4, 3), "size": torch.Size([4, 3]), "n": 7}
    for limit, dtype in [(None, None), (0, None), (0, torch.float16), (None, torch.bfloat16)]:
        store = ActivationStore(limit, dtype, tmp_path)
        store.put(0, env)
        back = store.get(0)
        assert back["size"] == env["size"] and back["n"] == 7 and back["x"].dtype == torch.float32
        tolerance = 0 if dtype is None else 1e-2
        torch.testing.assert_close(back["x"], env["x"], atol=tolerance, rtol=tolerance)
        assert (store.spilled > 0) == (limit == 0)
        store.close()
    assert not list(tmp_path.iterdir())  # spill files go with the store


def test_segments_run_once_reproduce_the_forward_pass():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(self.act(h)) + h.sum(1, keepdim=True)  # h is read after an in-place op

    model = InPlace().eval()
    gm = torch.fx.symbolic_trace(model)
    runner = GraphRunner(gm)
    x = torch.randn(8, 5)
    env = runner.start(x)
    middle = len(runner.nodes) // 2
    env = runner.run(env, 0, middle)
    kept = {k: v.clone() for k, v in env.items() if isinstance(v, torch.Tensor)}
    env = runner.run(env, middle, runner.end)
    for k, v in kept.items():
        assert torch.equal(v, runner.run(runner.start(x), 0, middle)[k])  # cached values were not mutated
    out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0].name
    torch.testing.assert_close(env[out_node], model(x))


def test_oneshot_equals_sequential_for_a_single_group_and_meets_budgets(calib):
    model = zoo.create("vgg")
    first = multinet.trace(model, calib[:1]).prunable_groups[0]
    # the first group sees the original model's statistics in both modes: same problem, same answer
    sequential = _compress(model, calib, ratio={first.id: 0.5})
    oneshot = _compress(model, calib, ratio={first.id: 0.5}, mode="oneshot")
    _same(oneshot, sequential, calib[:64])
    assert oneshot.cost is None
    everything = _compress(zoo.create("resnet"), calib, ratio=0.5, mode="oneshot")
    assert everything.flops_after < 0.5 * everything.flops_before
    budgeted = _compress(zoo.create("resnet"), calib, budget=multinet.Budget(flops=0.4), mode="oneshot")
    assert budgeted.flops_after <= 0.4 * budgeted.flops_before + 1
    assert [g.removed for g in budgeted.groups] == [sorted(g.removed) for g in budgeted.plan.groups if g.removed]
    for method in ("magnitude", "random", "magnitude+ls"):
        assert _compress(zoo.create("mlp"), calib, ratio=0.5, method=method, mode="oneshot").flops_after < \
            everything.flops_before


def test_a_run_for_its_watches_runs_only_what_they_read():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b, self.c = nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            g = self.b(self.act(h))  # the in-place ReLU changes h for every later reader
            return self.c(g) + h.sum(1, keepdim=True)

    gm = torch.fx.symbolic_trace(Chain().eval())
    runner = GraphRunner(gm)
    x = torch.randn(4, 5)
    full, part = {}, {}
    runner.run(runner.start(x), 0, runner.end, {"b": lambda v: full.setdefault("b", v.clone())})
    only = runner.required(0, runner.end, ["b"])
    assert only == {"a", "act"}  # b's input; neither b, c nor the sum need to run
    runner.run(runner.start(x), 0, runner.end, {"b": lambda v: part.setdefault("b", v.clone())}, only=only)
    torch.testing.assert_close(part["b"], full["b"])
    # an in-place op on a value a kept node computes runs too
    assert "act" in runner.required(0, runner.end, [], ["a"])


def test_the_cross_term_through_the_original_weights_matches_brute_force(calib):
    """A 3x3 conv (m = 9 x inputs > 2 x outputs) gets X^T (X_ref - X) W_ref from the shards and G W_ref added
    on the driver: equal to X^T X_ref W_ref in float64, and exactly G W_ref (so the fit returns the original
    weights) where nothing before the consumer has changed."""
    from multinet.calib.stats import BatchGrams, consumer_specs
    from multinet.pipeline.frontier_shard import dense_target

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()
    graph = multinet.trace(model, calib[:1])
    spec = consumer_specs(graph, ["2"])[0]
    target = dense_target(graph.module, "2")
    assert target.shape == (6 * 9 + 1, 4)
    x = calib[:32]
    with torch.no_grad():
        x_ref = model[1](model[0](x))
        x_cur = x_ref + 0.1 * torch.randn_like(x_ref)
    grams = BatchGrams(None, 0)
    moved = grams.stats("2", spec, x_cur, 0, spec, x_ref, target).resolved(target)
    rows = torch.nn.functional.unfold(x_cur.double(), 3, padding=1).transpose(1, 2).reshape(-1, 54)
    rows_ref = torch.nn.functional.unfold(x_ref.double(), 3, padding=1).transpose(1, 2).reshape(-1, 54)
    ones = torch.ones(len(rows), 1, dtype=torch.float64)
    rows, rows_ref = torch.cat([rows, ones], 1), torch.cat([rows_ref, ones], 1)
    brute = rows.T @ (rows_ref @ target.double())
    torch.testing.assert_close(moved.target_cross, brute, rtol=1e-5, atol=1e-5 * brute.abs().max().item())
    same = BatchGrams(None, 0).stats("2", spec, x_ref, 0, spec, x_ref, target)
    assert not same.delta_cross.any()  # the input did not move: the term is G W_ref to the last bit
    torch.testing.assert_close(same.resolved(target).target_cross, same.gram.double() @ target.double(), rtol=0, atol=0)
    # a 1x1 conv that widens keeps the m x m cross term (it is the cheaper one there)
    wide = nn.Sequential(nn.Conv2d(1, 3, 1), nn.Conv2d(3, 8, 1)).eval()
    assert dense_target(multinet.trace(wide, calib[:1]).module, "1") is None


def test_a_budget_run_measures_its_plan_from_the_frontier_without_another_pass(calib, monkeypatch):
    """After the last group the compressed model's frontier is at the model's end: its outputs there are
    the applied plan's outputs on the evaluation samples (up to the rounding of the full-width model), so
    the plan's error is measured without running the compressed model again; a shuffled loader, whose
    samples differ from the scheduler's, still gets its own pass."""
    from multinet.pipeline import compression

    runs = []
    run_outputs = compression.run_outputs
    monkeypatch.setattr(compression, "run_outputs", lambda model, inputs: runs.append(model) or run_outputs(model, inputs))
    budget = multinet.Budget(flops=0.5)
    result = _compress(zoo.create("resnet"), calib, budget=budget, eval_samples=200)
    assert runs == []
    split = compression.evaluation_inputs(calib, 128, 200)
    again = compression.output_error(run_outputs(result.model, split), run_outputs(zoo.create("resnet"), split))
    assert result.plan.measured_error == pytest.approx(again, rel=1e-4)
    monkeypatch.setattr(compression.SequentialPipeline, "final_outputs", lambda self, evaluation: None)
    _compress(zoo.create("resnet"), calib, budget=budget, eval_samples=200)
    assert len(runs) == 1  # without the frontier's outputs the plan's model runs once on the samples


def test_the_frontier_s_outputs_are_used_only_for_the_same_samples(calib):
    from multinet.pipeline.sequential import SequentialPipeline

    graph = multinet.trace(zoo.create("mlp"), calib[:1])
    pipeline = SequentialPipeline(graph, calib, batch_size=64, max_positions=16, damp=1e-6, device="cpu", seed=0)
    try:
        pipeline.run({g.id: 2 for g in graph.prunable_groups}, "reap", {}, {}, lambda *a: None)
        same = pipeline.final_outputs([calib[:64], calib[64:100]])
        assert same is not None and same[0].shape == (100, 10)
        assert pipeline.final_outputs([calib[1:65]]) is None  # other samples
        assert pipeline.final_outputs([calib[:32], calib[32:64]]) is None  # batched otherwise
    finally:
        pipeline.close()


class _Siblings(nn.Module):
    """Two Linear layers read the same tensor (q/k-style siblings): their statistics are equal."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 32)
        self.a, self.b = nn.Linear(32, 8), nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.body(x.flatten(1)))
        return self.a(h) + self.b(h)


def test_consumers_reading_one_tensor_share_one_inverse(calib, monkeypatch):
    """The group `body` feeds is read by `a` and `b` with the same Gram: one m^3 factorisation for both,
    and the same result as factoring each."""
    from multinet.pipeline import group_problems as gp

    torch.manual_seed(0)
    model = _Siblings().eval()
    sizes = []
    invert = gp.invert

    def counted(gram, tolerate):
        sizes.append(len(gram))
        return invert(gram, tolerate)

    monkeypatch.setattr(gp, "invert", counted)
    shared = _compress(model, calib, ratio=0.5)
    assert sizes == [33]  # one consumer problem of 32 inputs + bias was factored, not two
    monkeypatch.setattr(gp._SharedInverses, "of", lambda self, g: counted(gp.prepare_gram(g, self.damp)[0], True))
    alone = _compress(model, calib, ratio=0.5)
    assert sizes == [33, 33, 33]
    _same(shared, alone, calib, atol=1e-6)

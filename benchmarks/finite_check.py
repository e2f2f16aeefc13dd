"""The calibration rows' NaN/Inf check as a mask as large as the rows (before a2a81ba) or by their sum
(``solve.problem.all_finite``), timed in pairs in one process, in units of one plain pass.

    python benchmarks/finite_check.py zoo-resnet 1024 8 15      # model images size rounds (as scale.py builds them)
    python benchmarks/finite_check.py resnet50 64 112 3
"""
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)
import multinet, scale
import multinet.calib.stats as S
name, images, size, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, ex = scale.build(name, size)
if name == "zoo-resnet":
    from multinet import data
    x = data.load("digits").train_x[:1024]
else:
    torch.manual_seed(0)
    x = ex.repeat(images, 1, 1, 1) + 0.1 * torch.randn(images, *ex.shape[1:])
kw = dict(batch_size=32, max_positions=64, eval_samples=len(x), ratio=0.3)
fns = {"mask": lambda t: bool(torch.isfinite(t).all()), "sum": S.all_finite}
multinet.compress(model, x, **kw)
out = {k: [] for k in fns}; stat = {k: [] for k in fns}; kept = {}
for i in range(rounds):
    for k, fn in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
        S.all_finite = fn
        t = time.perf_counter(); r = multinet.compress(model, x, **kw); out[k].append(time.perf_counter() - t)
        stat[k].append(r.cost.seconds.get("statistics", float("nan")))
        kept[k] = {g: tuple(v) for g, v in r.kept.items()} if hasattr(r, "kept") else None
with torch.no_grad():
    ps = []
    for _ in range(5):
        t = time.perf_counter()
        for i in range(0, len(x), 32): model(x[i:i + 32])
        ps.append(time.perf_counter() - t)
p = statistics.median(ps)
for k in fns:
    print(k, "run passes", round(statistics.median(out[k]) / p, 2), "statistics passes", round(statistics.median(stat[k]) / p, 2))
print("paired sum/mask", sorted(round(a / b, 3) for a, b in zip(out["sum"], out["mask"])), "same kept", kept["sum"] == kept["mask"])

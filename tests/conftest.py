import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).parent))


import warnings  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def quiet_calibration():
    """Small calibration sets are the point of fast tests: silence the rows-per-column warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*calibration rows.*")
        yield


@pytest.fixture(autouse=True)
def same_torch_threads():
    """The CLI sets torch's thread count for the process (from the machine's load when not given); in a
    test session that would leak into every later test, and float32 GEMMs round differently on one thread
    than on two. Each test starts with the session's count."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def untimed_unify(monkeypatch):
    """unify times every link trial against its members' separate networks (``speed_check``); on a shared
    CI box a measured time would make which links are kept depend on the machine's load. Tests see a
    neutral ratio (1.0, never slower); the check itself is tested with given ratios and a fake clock
    (tests/test_unify_speed.py)."""
    from multinet.unification import fusion_timing, speed

    monkeypatch.setattr(speed, "unified_vs_separate", lambda *args, **kwargs: 1.0)
    # the same for timed fusion (infer fuses each set of sibling layers where that is not slower on its
    # first batch): every set fuses, as untimed; tests/test_fusion_timing.py gives ratios instead
    monkeypatch.setattr(fusion_timing, "fused_over_apart", lambda *args, **kwargs: 1.0)

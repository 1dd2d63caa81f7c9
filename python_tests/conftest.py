"""Suite-wide settings: one intra-op thread (the suite's tensors are small, and on a shared 2-core
machine a second thread mostly adds contention); GEMEXT_TEST_THREADS overrides. The `device`
fixture runs a learner test on cpu, and on cuda where it can.

The tests sit in a folder per layer of the package (kernels, vi, tasks, algorithms, families,
train) with no __init__.py: pytest imports each file by its base name, so base names stay unique
across folders. The shared helpers (fixtures.py, tolerances.py) sit here, on sys.path for every
folder."""
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests are derandomized by default (a fixed seed per test, no example database), so the
# suite passes or fails the same way on every run and in CI. GEMEXT_HYPOTHESIS=explore draws fresh
# examples each run (and keeps a local database of failures) for bug hunting.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("GEMEXT_HYPOTHESIS") == "explore" else "ci")

torch.set_num_threads(int(os.environ.get("GEMEXT_TEST_THREADS", "1")))
sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (fixtures.py, tolerances.py)


def _no_cuda_reason() -> str:
    """Why the learner tests cannot run on CUDA here ('' when they can): the learners call gemext's
    fused kernels, so a CUDA device needs a build that compiled them."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    import gemext

    return "" if gemext.build_info()["cuda"] else "gemext built without its CUDA kernels"


NO_CUDA = _no_cuda_reason()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                                           pytest.mark.skipif(bool(NO_CUDA), reason=NO_CUDA)])])
def device(request) -> torch.device:
    """The device of a learner test: the learner is moved there (`learner.to(device)`, as the task
    families do) and so are its tasks (`task.to(device)`); cuda is skipped, with the reason, on a
    machine that cannot run it."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Each test (and any process it starts) runs in its own folder: files land there, and a
    `python -m gemext` child never imports the source tree's ./gemext (which has no compiled
    module after a non-editable `pip install .`) instead of the installed package."""
    monkeypatch.chdir(tmp_path)

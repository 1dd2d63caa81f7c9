"""Suite-wide settings: one intra-op thread (the suite's tensors are small, and on a shared 2-core
machine a second thread mostly adds contention); GEMEXT_TEST_THREADS overrides."""
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
sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (conjugate.py)


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Each test (and any process it starts) runs in its own folder: files land there, and a
    `python -m gemext` child never imports the source tree's ./gemext (which has no compiled
    module after a non-editable `pip install .`) instead of the installed package."""
    monkeypatch.chdir(tmp_path)

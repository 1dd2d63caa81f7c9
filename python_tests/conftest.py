"""Suite-wide settings: one intra-op thread (the suite's tensors are small, and on a shared 2-core
machine a second thread mostly adds contention); GEMEXT_TEST_THREADS overrides."""
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("GEMEXT_TEST_THREADS", "1")))
sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (conjugate.py)

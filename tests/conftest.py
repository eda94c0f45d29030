# TRITON_INTERPRET must be set before any @triton.jit function is defined, so it goes first.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NANOABSORBER_QUIET", "1")

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (a few, still run in CI)")


@pytest.fixture(autouse=True)
def _restore_global_settings():
    """A test that runs a script's main() in-process (eval.py sets the torch threads and the
    attention path) must not change how the tests after it compute."""
    import nanoabsorber.attention as attention
    import nanoabsorber.losses as losses

    saved = torch.get_num_threads(), attention._IMPL, losses._IMPL
    yield
    torch.set_num_threads(saved[0])
    attention._IMPL, losses._IMPL = saved[1], saved[2]

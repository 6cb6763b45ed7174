"""tests/model set-up: no Hub access; one intra-op thread (tiny matmuls; OpenMP spins on busy
cores and makes them 2-3x slower). Models: tiny_models.py."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""tests/optim set-up: one intra-op thread (small tensors; avoids OpenMP spin on busy cores)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

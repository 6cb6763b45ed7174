"""Shared test set-up: offline hub, deterministic seeds, a small thread count."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels are tested on CPU tensors under Triton's interpreter, which triton.jit
# picks at decoration time; peft and bitsandbytes import triton, so set it before any test
# module is collected (tests/*/test_triton_*.py).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _kernel_mode():
    """QLORA_KERNELS is read once per process: a test that sets it starts and ends fresh."""
    from qlora import kernels

    kernels.reread_mode()
    yield
    kernels.reread_mode()

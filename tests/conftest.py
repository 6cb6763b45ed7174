"""Shared test set-up: offline hub, deterministic seeds, a small thread count."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels are tested on CPU tensors under Triton's interpreter, which triton.jit
# picks at decoration time; peft and bitsandbytes import triton, so set it before any test
# module is collected (tests/*/test_triton_*.py).
os.environ["TRITON_INTERPRET"] = "1"

import traceback  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


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


class HostReads(TorchDispatchMode):
    """Records the ops that bring a tensor's value to the host: a device sync on a GPU, but for
    `unpadded_on_host`, which only reads a mask that is on the host (here every tensor is).
    Indexing by a boolean mask counts as a nonzero."""
    NAMES = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "item"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            name = "nonzero"  # indexing by a boolean mask: the kernel's nonzero waits for the count
        if name in self.NAMES and not any(f.name == "unpadded_on_host" for f in traceback.extract_stack()):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture()
def host_reads() -> type[HostReads]:
    """`with host_reads() as reads: ...` records the ops that read a value back (reads.seen)."""
    return HostReads

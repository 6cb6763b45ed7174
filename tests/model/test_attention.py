"""--attn-implementation: set_attention switches transformers' attention, or says clearly why not."""
import pytest
import torch

from qlora.errors import InputError
from qlora.model.attention import set_attention

from tiny_models import tiny_model


def test_auto_keeps_the_models_attention_and_a_name_switches_it():
    model = tiny_model("llama", torch.float32)
    set_attention(model, "auto")
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sdpa = model(input_ids=ids).logits
        set_attention(model, "eager")
        assert model.config._attn_implementation == "eager"
        eager = model(input_ids=ids).logits
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, message", [
    ("flash", "expected auto or one of sdpa, eager"),
    ("kernels-community/flash-attn", "expected auto or one of"),  # Hub kernels are remote code: never fetched
    ("flex_attention", "torch trains flex attention on CUDA only"),  # torch has no CPU backward for it
    ("flash_attention_2", "the flash-attn package for it is not installed"),
])
def test_what_cannot_run_is_an_error_naming_the_flag(name, message):
    model = tiny_model("llama", torch.float32)
    with pytest.raises(InputError, match=f"--attn-implementation {name}: {message}"):
        set_attention(model, name, "cpu")
    assert model.config._attn_implementation == "sdpa"  # unchanged


def test_transformers_own_refusal_is_named_too(monkeypatch):
    """Past qlora's checks, what transformers refuses still comes back naming the flag."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    model = tiny_model("llama", torch.float32)
    with pytest.raises(InputError, match="--attn-implementation flash_attention_2: transformers cannot run it here"):
        set_attention(model, "flash_attention_2", "cpu")

"""Tiny random causal LMs of every architecture prepare_model supports (transformers
classes, hidden 64, 2 layers, vocab 256), and the dense twin of a prepared model."""
import torch
from torch import nn

from qlora import Linear4bit

ARCHS = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2")


def tiny_config(arch: str, **overrides):
    """A 2-layer, hidden-64, vocab-256 config of `arch` (transformers classes, random init)."""
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=16)
    elif arch == "phi3":
        cfg = tf.Phi3Config(**{**common, "num_key_value_heads": 4})
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str, dtype=torch.bfloat16, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.to(dtype).eval()


def dequantized_twin(prepared: nn.Module, arch: str, dtype=torch.float32, **overrides) -> nn.Module:
    """A plain transformers model of the same config whose weights are the prepared model's
    base weights, Linear4bit layers decoded (Conv1D ones transposed back); no LoRA."""
    dense = tiny_model(arch, dtype, **overrides)
    state = {}
    for name, m in prepared.named_modules():
        if isinstance(m, Linear4bit):
            key = name.replace(".base_layer", "")
            w = m.weight.dequantize(dtype)
            state[f"{key}.weight"] = w.t().contiguous() if m.fan_in_fan_out else w
    for name, p in prepared.named_parameters():
        if "lora_" not in name:
            state[name.replace(".base_layer", "")] = p.detach().to(dtype)
    missing, unexpected = dense.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    tied = {"lm_head.weight"}
    assert set(missing) <= tied, missing
    return dense.eval()


def bnb_dequantize_path(peer: nn.Module) -> nn.Module:
    """Keep bitsandbytes on its dequantize + linear path: on AVX512-BF16 CPUs, eval mode
    otherwise repacks the weights for bnb's own inference kernel (another summation order,
    so logits differ in the last bit); these tests are about the file layout."""
    for m in peer.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return peer

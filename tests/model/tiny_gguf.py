"""Tiny random-weight GGUF files of each architecture qlora's GGUF import claims, written the
way llama.cpp's convert_hf_to_gguf.py writes them, with the `gguf` package's own GGUFWriter
(not qlora's writer, so a qlora bug cannot hide on both sides).

    model, path = write_tiny_gguf("gemma2", tmp_path)   # the transformers model + its .gguf

What follows llama.cpp's converter (conversion/{llama,qwen,gemma,phi,gpt2}.py, gguf-py's
tensor name map):
- names: gguf.get_tensor_name_map(arch) on the transformers names;
- llama/mistral: q and k rows permuted per head (LlamaModel.permute); Mistral is written as
  architecture "llama" (llama.cpp has no "mistral" architecture);
- gemma2/gemma3: every "*norm.weight" stored + 1 (Gemma's RMSNorm scales by 1 + w);
- gpt2: Conv1D weights ([in, out]) transposed to [out, in], the causal-mask buffers dropped,
  the tied head also written as "output.weight" (as older converters did; transformers'
  GPT-2 processor has a case for it);
- tied embeddings: no "output.weight" (llama.cpp skips a head that is the embedding);
- metadata: each architecture's hyper-parameter keys, a chat template and a tokenizer: byte-level
  BPE ("gpt2": 256 byte tokens + merges) or sentencepiece ("llama": <unk> <s> </s>, 256 byte
  tokens, scored pieces), 3 control tokens last (pad, bos, eos).
Tensors are F32 unless `ggml_type` is given (2-D ones whose rows fit its block).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt2")
TOKENIZER = {"llama": "gpt2", "mistral": "llama", "qwen2": "gpt2", "gemma2": "llama", "gemma3": "llama",
             "phi3": "llama", "gpt2": "gpt2"}
"""Each architecture's usual tokenizer.ggml.model: byte-level BPE ("gpt2": Llama 3, SmolLM2,
Qwen2, GPT-2) or sentencepiece ("llama": Mistral, Gemma, Phi-3)."""
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # the last ids: pad, bos, eos
VOCAB = 288
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ h", "Ġh i"]
SPM_PIECES = ["▁", "t", "h", "e", "i", "▁t", "he", "▁the", "▁h", "▁hi"]  # scores fall in this order


def vocab(kind: str) -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) of a `VOCAB`-token vocabulary of tokenizer model `kind`,
    as llama.cpp's _set_vocab_gpt2 / _set_vocab_sentencepiece write them (types: 1 normal,
    2 unknown, 3 control, 5 unused, 6 byte); unused "[PADn]" rows fill it up."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if kind == "gpt2":
        chars = bytes_to_unicode()
        tokens = [chars[b] for b in range(256)] + [m.replace(" ", "") for m in BPE_MERGES]
        types = [1] * len(tokens)
    else:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
        types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * (len(tokens) - len(SPM_PIECES)) + [-float(i) for i in range(len(SPM_PIECES))]
    pad = VOCAB - len(SPECIALS) - len(tokens)
    return (tokens + [f"[PAD{i}]" for i in range(pad)] + SPECIALS, types + [5] * pad + [3] * len(SPECIALS),
            scores + [-1000.0] * (pad + len(SPECIALS)))


def tiny_config(arch: str, **overrides):
    """A 2-layer, hidden-64 config of `arch` whose fields all survive the GGUF metadata."""
    import transformers as tf

    cfg = _config(tf, arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _config(tf, arch: str):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
                  pad_token_id=VOCAB - 3, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
    if arch == "llama":
        return tf.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**common, rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, rope_theta=10000.0, tie_word_embeddings=True)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=64, tie_word_embeddings=True)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=64, tie_word_embeddings=True)
    if arch == "phi3":
        return tf.Phi3Config(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if arch == "gpt2":
        # n_positions 1024 as every GPT-2: transformers' GGUF config drops the context length
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=1024,
                             pad_token_id=VOCAB - 3, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, **overrides):
    """The float32 transformers model of `tiny_config(arch)`, random weights (norms too)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases: away from their init so a missed +1 or bias shows
                p.normal_(0.0 if "bias" in name else 0.5, 0.1)
    return model


def _metadata(w, arch: str, cfg) -> None:
    if arch == "gpt2":
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch in ("llama", "mistral"):
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch in ("qwen2",):
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_sliding_window(0)
    if arch in ("gemma2", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)


def _tokenizer(w, cfg, kind: str) -> None:
    tokens, types, scores = vocab(kind)
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "gpt2":
        w.add_token_merges(BPE_MERGES)
    else:
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_chat_template(CHAT_TEMPLATE)


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in llama.cpp's layout, in the model's parameter order."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    cfg = model.config
    code = next(k for k, v in MODEL_ARCH_NAMES.items() if v == ("llama" if arch == "mistral" else arch))
    table = get_tensor_name_map(code, cfg.num_hidden_layers)
    tied = cfg.tie_word_embeddings
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (tied and name == "lm_head.weight"):
            continue
        stem, suffix = name.rsplit(".", 1)
        gname = table.get_name(stem)
        assert gname is not None, name
        w = t.detach().float().clone()
        if arch in ("llama", "mistral") and stem.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if stem.endswith("q_proj") else cfg.num_key_value_heads
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            w = w + 1
        if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            w = w.T
        out[f"{gname}.{suffix}"] = np.ascontiguousarray(w.numpy())
    if arch == "gpt2":
        out["output.weight"] = out["token_embd.weight"]
    return out


def write_tiny_gguf(arch: str, directory: Path, seed: int = 0, ggml_type=None, name: str | None = None,
                    tokenizer: str | None = None, **overrides):
    """(transformers model, path of its GGUF in `directory`) for architecture `arch`; `name`
    is general.name (transformers builds a Mistral class only for exactly "mistral"),
    `tokenizer` the tokenizer model (default: TOKENIZER[arch])."""
    import gguf

    model = tiny_model(arch, seed, **overrides)
    path = Path(directory) / f"{arch}.gguf"
    w = gguf.GGUFWriter(path, "llama" if arch == "mistral" else arch)
    w.add_name(name or f"tiny {arch}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ggml_type is None else gguf.LlamaFileType.MOSTLY_Q8_0)
    _metadata(w, arch, model.config)
    _tokenizer(w, model.config, tokenizer or TOKENIZER[arch])
    for gname, a in gguf_tensors(model, arch).items():
        if ggml_type is not None and a.ndim == 2 and a.shape[-1] % 32 == 0:
            w.add_tensor(gname, gguf.quants.quantize(a, ggml_type), raw_dtype=ggml_type)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, path

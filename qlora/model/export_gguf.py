"""Export a fine-tuned model as GGUF: the merged 16-bit model, in the base GGUF's own layout.

    export_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/mine/adapter", "mine.gguf", "q8_0")
    qlora export --gguf mine.gguf --model BASE.gguf --adapter runs/mine/adapter --type f16|q8_0|q4_0

The weights are those `qlora merge` writes (save.merged_model: the 4-bit base as trained,
each layer dequant(W) + scaling * B @ A, rounded once to 16 bits). Every tensor of the base
GGUF is written under its own name and in its own layout (llama's q/k rows permuted back as
llama.cpp's converter does; gemma's norms + 1; GPT-2's Conv1D weights transposed), checked
on the spot by running transformers' own GGUF tensor processor back over it. The metadata
(architecture, hyper-parameters, tokenizer, chat template) is copied with its types; only
`general.file_type` changes. Matrices whose rows split into 32-blocks take `type` (f16, q8_0
or q4_0), the rest F16; 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them.
The base must be a GGUF file (its metadata is what llama.cpp runtimes need). The file is
written atomically (gguf_file.write_gguf). Peak: the merged model in 16 bits + one tensor.
Tests: tests/model/test_smollm2.py (the round trip through transformers).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as T
from gguf.constants import LlamaFileType

from .checkpoint_files import CheckpointError, resolve
from .gguf_file import GGUFError, GGUFValue, read_gguf, write_gguf
from .gguf_model import gguf_names, gguf_source

TYPES = {"f16": (T.F16, LlamaFileType.MOSTLY_F16), "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
         "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0)}
PERMUTED = ("llama", "mistral")  # llama.cpp's converter permutes the q/k rows of these


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: the inverse of transformers' LlamaTensorProcessor un-permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(gguf_name: str, w: np.ndarray, arch: str, config: dict) -> np.ndarray:
    """Tensor `w` of the transformers model as GGUF stores tensor `gguf_name`."""
    if arch in PERMUTED and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = config["num_attention_heads"] if ".attn_q." in gguf_name else config["num_key_value_heads"]
        return _permute(w, heads)
    if arch in ("gemma2", "gemma3") and "norm.weight" in gguf_name:
        return w + 1
    if arch == "gpt2" and gguf_name.endswith(("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight",
                                              "attn_output.weight")):
        return np.ascontiguousarray(w.T)
    return w


def export_gguf(base: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                type: str = "f16", quant_type: str = "nf4", double_quant: bool = True, progress: bool = True) -> Path:
    """Write the merged model (base GGUF + LoRA adapter, trained on the base in `quant_type`)
    as GGUF file `output`; see the module docstring."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from .save import merged_model

    if type not in TYPES:
        raise CheckpointError(f"export: --type {type!r}; choose one of {', '.join(TYPES)}")
    source = gguf_source(resolve(base))
    if source is None:
        raise CheckpointError(f"{base}: export --gguf needs a GGUF base (its metadata, tokenizer and chat template "
                              "are carried over); pass the .gguf file the adapter was trained on")
    src = read_gguf(source)
    arch = src.get("general.architecture")
    model, layers = merged_model(base, adapter, quant_type, double_quant)
    conv1d = {f"{name}.weight" for name, (_, _, conv) in layers.items() if conv}
    config = model.config.to_dict()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    hf_names = gguf_names(model, arch, processor)
    state = model.state_dict()
    wanted, file_type = TYPES[type]

    def tensor(name: str) -> np.ndarray:
        hf = hf_names.get(name, "lm_head.weight" if (arch, name) == ("gpt2", "output.weight") else None)
        if hf is None or hf not in state:
            return src.read(name).numpy()  # not a model weight (e.g. rope frequencies): as it was
        w = state[hf].detach().float().numpy()
        if hf in conv1d:
            w = w.T  # a merged Conv1D is a dense [out, in] layer here; transformers keeps [in, out]
        g = to_gguf_layout(name, np.ascontiguousarray(w), arch, config)
        back = processor.process(weights=g, name=name, tensor_key_mapping=hf_names, parsed_parameters={"tensors": {}})
        if back.name is not None and not np.array_equal(back.weights, w):
            raise GGUFError(f"{output}: tensor {name!r} would not read back as {hf!r}: the {arch} layout is not "
                            "what transformers expects; please report this")
        return g

    infos = list(src.tensors.values())
    specs = []
    for info in infos:
        fits = len(info.shape) == 2 and info.shape[-1] % 32 == 0
        specs.append((info.name, info.shape, int(wanted if fits else T.F16 if len(info.shape) == 2 else T.F32)))
    fields = dict(src.fields)
    fields["general.file_type"] = GGUFValue(4, int(file_type))  # UINT32, as llama.cpp writes it
    write_gguf(output, fields, specs, tensor, alignment=src.alignment, progress=progress)
    return Path(output)

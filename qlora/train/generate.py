"""Generate text from a 4-bit base model, optionally with a LoRA adapter, streamed as it comes.

    qlora generate --model PATH [--adapter DIR] --prompt "Write a function that ..."

The prompt is wrapped in the tokenizer's chat template when it has one, else in the
Alpaca template qlora trains instruction rows with (--raw sends it as is). Compute is bf16 on
GPUs and CPUs with native bf16, fp32 on CPUs that emulate it (as `--compute-dtype auto`).
"""
from __future__ import annotations

import torch

from ..errors import InputError
from .data import ALPACA


def generate(model_path: str, prompt: str, adapter: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, raw: bool = False, seed: int = 0,
             trust_remote_code: bool = False, stream: bool = True) -> str:
    """The completion of `prompt` (greedy when temperature is 0); printed as it streams."""
    from transformers import AutoTokenizer, TextStreamer

    from ..model.adapter import load_adapter
    from ..model.checkpoint_files import resolve
    from ..model.load import load_model
    from .config import native_bf16

    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise InputError("--temperature must be >= 0, --top-p in (0, 1] and --max-new-tokens >= 1")
    path = resolve(model_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if native_bf16(device) else torch.float32  # as --compute-dtype auto
    model = load_model(path, device=device, compute_dtype=dtype, trust_remote_code=trust_remote_code, progress=False)
    if adapter:
        load_adapter(model, adapter, trainable=False)
    if raw:
        text = prompt
    elif getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = ALPACA.format(instruction=prompt)
    ids = tokenizer(text, return_tensors="pt",
                    add_special_tokens=not getattr(tokenizer, "chat_template", None)).to(device)
    torch.manual_seed(seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    sample = temperature > 0
    out = model.eval().generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
        top_p=top_p if sample else None, streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

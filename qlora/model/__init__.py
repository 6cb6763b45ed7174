"""Step 3, a transformers model -> a QLoRA model.

    prepare.py           prepare_model: quantize the linear layers, add LoRA, freeze, checkpoint
    targets.py           which modules are linear layers, norms, the output head; target selectors
    load.py              load_model: stream-quantize a checkpoint on load (or read a 4-bit one)
    calibrate.py         load_calibrated: GPTQ / LoftQ layer by layer on calibration text
    checkpoint_files.py  find and stream checkpoint files (safetensors, .bin, GGUF)
    gguf_file.py         read and write GGUF files; gguf_model.py: a GGUF file as a transformers checkpoint
    adapter.py           save_adapter / load_adapter: PEFT-format adapter files
    save.py              save_quantized / merge_adapter: bitsandbytes and merged 16-bit checkpoints
    export_gguf.py       the merged model as a GGUF file
    loss.py              the causal-LM loss with the head and cross-entropy fused (IGNORE: -100)
    packing.py           packed batches: the model's inputs that keep each document apart
    shard.py             FSDP2 sharding per block (load_sharded), DDP
    random_checkpoint.py random-weight checkpoints of any config, for tests and benchmarks
"""

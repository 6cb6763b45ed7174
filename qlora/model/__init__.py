"""Step 3, a transformers model -> a QLoRA model.

    prepare.py           prepare_model: quantize the linear layers, add LoRA, freeze, checkpoint
    adapter.py           save_adapter / load_adapter: PEFT-format adapter files
    targets.py           which modules are linear layers, norms, the output head
    load.py              load_model: stream-quantize a checkpoint on load
    save.py              save_quantized / merge_adapter: bitsandbytes and merged 16-bit checkpoints
    checkpoint_files.py  find and stream checkpoint files
"""

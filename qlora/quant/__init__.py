"""Step 1, numbers -> 4 bits.

    codebooks.py    NF4 / FP4 / INT4 tables and the 8-bit dynamic maps, with their derivations
    blockwise.py    4-bit block-wise quantize / dequantize in pure PyTorch: the oracle (TINY)
    blockwise8.py   8-bit codes: bitsandbytes' grid rounding (double quantization), the nearest
                    code (8-bit AdamW state), one decoder
    tensor.py       QuantizedTensor + quantize(): packed codes and scales, the bitsandbytes layout
    gptq.py         GPTQ (output-error) codes in the same layout; loftq.py: LoftQ's Q + B A
    report.py       `qlora quantize-report`: how well each code book stores a model's weights
The fast decode and quantize kernels are a floor below, in qlora/kernels.
"""

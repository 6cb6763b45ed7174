"""Step 5, the loop.

    config.py   TrainConfig: one dataclass = CLI flags = YAML recipe
    data.py     rows -> tokens: Alpaca, input/output, prompt/completion, chat, text; packing
    loop.py     train(): accumulation, clipping, schedule, eval, checkpoints, exact resume
    report.py   metrics.jsonl, summary, loss plot, demo generations
    generate.py streaming generation with a base (+ adapter)
"""
from .config import TrainConfig
from .loop import TrainingError, train

__all__ = ["TrainConfig", "TrainingError", "train"]

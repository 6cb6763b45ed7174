"""Step 5, the loop.

    config.py       TrainConfig: one dataclass = CLI flags = YAML recipe
    data.py         rows -> tokens: Alpaca, input/output, prompt/completion, chat, text; packing
                    (documents side by side, kept apart; the default)
    loop.py         train(): accumulation, clipping, schedule, eval, exact resume
    checkpoint.py   checkpoints: list, save, load (adapter, optimizer, schedule, RNG), any world size
    distributed.py  torchrun ranks, FSDP2 / DDP, the data split and the collectives
    report.py       metrics.jsonl, summary, loss plot, demo generations
    generate.py     streaming generation with a base (+ adapter)
"""
from .config import TrainConfig
from ..errors import TrainingError
from .loop import train

__all__ = ["TrainConfig", "TrainingError", "train"]

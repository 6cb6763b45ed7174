"""Step 4 of the flow, the update: AdamW with 32-bit or 8-bit state, paged between the
accelerator and host memory, plus lr schedules and gradient clipping.

    from qlora.optim import AdamW, clip_grad_norm, scheduler
    opt = AdamW(model.parameters(), lr=2e-4, weight_decay=0.0, state_bits=32, paged=True)
    sched = scheduler(opt, "constant_with_warmup", warmup_steps=10)

Files: adamw.py (the optimizer), paging.py (host <-> device pages), schedule.py (lr
schedules, clipping); the 8-bit state's codec is quant/blockwise8.py. Tests: `pytest tests/optim`.
"""
from qlora.optim.adamw import AdamW
from qlora.optim.paging import Pager
from qlora.optim.schedule import SCHEDULES, clip_grad_norm, lr_schedule, scheduler, step_back

__all__ = [
    "AdamW",
    "Pager",
    "SCHEDULES",
    "clip_grad_norm",
    "lr_schedule",
    "scheduler",
    "step_back",
]

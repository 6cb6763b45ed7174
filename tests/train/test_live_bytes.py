"""Tests of qlora/train/live_bytes.py: the live CPU tensor peak is exact and survives flushes."""
import torch

from qlora.train.live_bytes import LiveTensorPeak


def test_peak_is_the_highest_sum_of_live_tensor_bytes():
    live = LiveTensorPeak().start()
    a = torch.empty(1000, dtype=torch.float32)  # 4,000 B
    b = torch.empty(3000, dtype=torch.bfloat16)  # 6,000 B: 10,000 live
    del a
    live.flush()  # the count carries over the profiler's restart
    c = torch.empty(2000, dtype=torch.float64)  # 16,000 B: 22,000 live
    del b, c
    d = torch.empty(100, dtype=torch.uint8)
    peak = live.stop()
    assert peak == 22_000
    assert live.live == 100
    del d


def test_a_step_of_autograd_is_counted_in_forward_and_backward():
    x = torch.randn(256, 256, requires_grad=True)
    w = torch.randn(256, 256)
    live = LiveTensorPeak().start()
    y = torch.tanh(x @ w)  # x @ w (256 KiB) and tanh's output (256 KiB, saved for backward)
    y.sum().backward()
    peak = live.stop()
    # at least forward's two [256, 256] fp32 tensors live at once; all in all a few of them
    assert 2 * 256 * 256 * 4 <= peak <= 6 * 256 * 256 * 4


def test_inactive_under_another_profiler():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        live = LiveTensorPeak().start()
        assert not live.active
        _ = torch.empty(1000)
        assert live.stop() == 0


def test_a_counter_left_on_does_not_blind_the_next():
    """A run that raises after it started counting never stops its counter; the next one counts."""
    left = LiveTensorPeak().start()
    live = LiveTensorPeak().start()
    assert live.active and not left.active
    a = torch.empty(1000, dtype=torch.uint8)
    assert live.stop() == 1000
    del a

"""The peak of live CPU tensor bytes, counted from the allocator's own reports.

    live = LiveTensorPeak().start()   # from here, every CPU tensor allocation and free is counted
    ...                               # the work; live.flush() now and then (bounds its buffer),
                                      # live.pause() / live.resume() around work not to count
    peak = live.stop()                # the highest sum of live tensor bytes counted (bytes)

CUDA has `max_memory_allocated`; torch's CPU allocator keeps no such counter, but it reports
every allocation and free to the profiler when memory profiling is on. Here the profiler runs
with memory events only (record scope USER_SCOPE: no operator is recorded), so the figure is
exactly what the planner predicts (live tensors: no glibc caches, no oneDNN primitive cache,
no code) and does not depend on how busy the machine is. Reading the events back costs about
a microsecond per allocation, which on a model of small operators is a good part of a step:
the trainer counts its first steps and then only steps with a longer batch than any counted
(memory.Baseline.before_step). Tensors that were alive before `start` and are freed later
count negative, so start before the work allocates.
Tests: tests/train/test_live_bytes.py.
"""
from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from collections.abc import Iterator


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Kineto prints a line to fd 2 on every profiler start and stop: silence that fd meanwhile."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_counting: "LiveTensorPeak | None" = None
"""The counter whose profiler is on now, if any."""


class LiveTensorPeak:
    """Running sum and peak of live CPU tensor bytes between `start` and `stop`."""

    def __init__(self) -> None:
        self.live = 0  # bytes allocated minus freed while counting
        self.peak = 0
        self.active = False  # started and not stopped
        self.running = False  # counting now (not paused)

    def _enable(self) -> None:
        from torch._C._autograd import _enable_profiler, _prepare_profiler
        from torch._C._profiler import (ProfilerActivity, ProfilerConfig, ProfilerState, RecordScope,
                                        _ExperimentalConfig)

        # state, report_input_shapes, profile_memory, with_stack, with_flops, with_modules, experimental
        config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
        activities = {ProfilerActivity.CPU}
        with _quiet_stderr():
            _prepare_profiler(config, activities)
            _enable_profiler(config, activities, {RecordScope.USER_SCOPE})
        self.running = True
        global _counting
        _counting = self

    def _collect(self) -> None:
        from torch._C._autograd import DeviceType, _disable_profiler

        with _quiet_stderr():
            result = _disable_profiler()
        self.running = False
        global _counting
        _counting = None
        events = [(e.start_ns(), e.nbytes()) for e in result.events()
                  if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
        for _, nbytes in sorted(events, key=lambda t: t[0]):  # stable: same-ns events keep their order
            self.live += nbytes
            if self.live > self.peak:
                self.peak = self.live

    def start(self) -> "LiveTensorPeak":
        """Begin counting; a no-op (`active` stays False) while another profiler runs. A counter
        left on (a run that raised before it measured) is stopped first."""
        import torch

        if _counting is not None and _counting is not self:
            _counting.stop()
        if torch.autograd._profiler_enabled():
            return self
        self._enable()
        self.active = True
        atexit.register(self.stop)  # a profiler still on at interpreter exit crashes it
        return self

    def flush(self) -> None:
        """Fold the events so far into the peak and keep counting (the profiler's buffer is freed)."""
        if self.running:
            self._collect()
            self._enable()

    def pause(self) -> None:
        """Stop counting for a while (no cost meanwhile). What is allocated and freed until `resume`
        is not seen, so pause only where the work allocates as much as it frees (between two
        steady-state training steps)."""
        if self.running:
            self._collect()

    def resume(self) -> None:
        if self.active and not self.running:
            self._enable()

    def stop(self) -> int:
        """Stop counting; the peak in bytes."""
        self.pause()
        self.active = False
        atexit.unregister(self.stop)
        return self.peak

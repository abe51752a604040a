"""The phase table: each phase's time and rate, and each phase's peak GPU memory apart from the rest of the run."""

from __future__ import annotations

from kontext_trainer.phases import OUTSIDE_PHASES, PhaseClock

GIB = 2**30


class Allocator:
    """A device allocator's peak statistics as CUDA's report them: the peak since the last reset, which restarts
    the count at what is allocated now."""

    def __init__(self):
        self.now = self.peak = 0

    def take(self, gib: float) -> None:
        self.now += int(gib * GIB)
        self.peak = max(self.peak, self.now)

    def give(self, gib: float) -> None:
        self.now -= int(gib * GIB)

    def read_and_reset(self) -> tuple[int, int]:
        out = (self.peak, self.peak + GIB // 2)  # reserved: half a GiB above allocated
        self.peak = self.now
        return out


def test_each_phase_reports_its_own_peak_and_the_run_its_highest():
    mem = Allocator()
    clock = PhaseClock(memory=mem.read_and_reset)
    mem.take(1)  # before any phase
    with clock.phase("latent cache") as phase:
        mem.take(4)
        mem.give(4)
        phase["items"] = 10
    mem.take(2)  # the steps: 3 GiB in all
    mem.give(2)
    with clock.phase("validation"):
        mem.take(1)
        with clock.phase("validation loss"):
            mem.take(6)  # 8 GiB: the run's peak, inside the inner phase
            mem.give(6)
    mem.give(1)
    with clock.phase("checkpoint"):
        pass
    out = clock.summary()
    assert out["peak_gpu_gib_by_phase"] == {OUTSIDE_PHASES: 3.0, "latent cache": 5.0, "validation": 8.0,
                                            "validation loss": 8.0, "checkpoint": 1.0}
    assert out["peak_gpu_allocated_gib"] == 8.0
    assert out["peak_gpu_reserved_gib"] == 8.5
    assert out["latent cache_per_s"] > 0  # the items set inside the phase give it a rate
    assert set(out) >= {"latent cache_s", "validation_s", "validation loss_s", "checkpoint_s", "total_s"}


def test_no_memory_figures_off_the_gpu():
    clock = PhaseClock()
    with clock.phase("manifest"):
        pass
    out = clock.summary()
    assert "peak_gpu_gib_by_phase" not in out and "peak_gpu_allocated_gib" not in out
    assert out["manifest_s"] >= 0


def test_an_error_is_placed_in_the_innermost_phase_it_left():
    clock = PhaseClock()
    err = RuntimeError("out of memory")
    try:
        with clock.phase("validation"):
            with clock.phase("validation loss"):
                raise err
    except RuntimeError:
        pass
    assert clock.phase_of(err) == "validation loss"
    assert clock.phase_of(RuntimeError("elsewhere")) == OUTSIDE_PHASES  # raised between phases: the steps
    assert clock.summary()["validation_count"] == 1  # the phases that failed still count their time


def test_the_clock_does_not_keep_a_handled_error_alive():
    import gc
    import weakref

    class DiskFull(OSError):  # a subclass: built-in exception objects take no weak references
        pass

    clock = PhaseClock()
    try:
        with clock.phase("checkpoint"):
            raise DiskFull("disk full")
    except OSError as exc:
        ref = weakref.ref(exc)
        assert clock.phase_of(exc) == "checkpoint"
    gc.collect()
    assert ref() is None  # its traceback (and whatever its frames held) is gone

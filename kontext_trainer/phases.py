"""Where the time of a whole run goes: the phase table a user (and benchmarks/full_run.py) reads.

In: the recipe's phases as they happen (`with clock.phase("model load"):`), every optimizer step's wall time with
the shapes it ran, and the device. Out: `summary()`, a JSON-ready dict: seconds per phase (text and latent caching
with their rates), the first step of each new step shape (where torch.compile compiles, if it does), the median
of the other steps (the steady state), validation / checkpoint / save totals, peak GPU memory (the run's, and each
phase's: `peak_gpu_gib_by_phase`, with the training steps and whatever runs outside a named phase under
"training"), the whole run.

A step shape is what the compiled blocks see: the bucket (target and reference sizes) and the micro-batch size.
The steady state leaves out those first steps, so compile time shows up in its own line instead of inflating it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

OUTSIDE_PHASES = "training"  # the peak-memory entry of everything outside a named phase: the steps, mostly


@dataclass
class PhaseClock:
    """The wall time of a run's phases and steps (see the module docstring); `summary()` is the table."""

    started: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    step_times: list[float] = field(default_factory=list)
    first_of_shape: list[float] = field(default_factory=list)
    _seen: set = field(default_factory=set)
    device: Any = None
    """The CUDA device whose peak memory each phase records (None or a CPU device: no memory figures)."""
    memory: "Callable[[], tuple[int, int]] | None" = None
    """Reads and restarts the device's peak (allocated, reserved) bytes; CUDA's allocator statistics unless set."""
    peaks: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Peak (allocated, reserved) bytes per phase, OUTSIDE_PHASES for the rest (a nested phase counts in its
    outer one too)."""
    _open: list[str] = field(default_factory=list)
    # (id of the last exception that left a phase, the innermost phase it left): phase_of. An id, not the exception,
    # so a handled exception's traceback (and the tensors of its frames) is not kept alive by the clock
    _raised: tuple[int, str] = (0, "")

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a block of work and add it to `name` (phases that repeat, e.g. validation, accumulate); yields a
        dict whose "items" (set it inside) gives the phase a rate. On a CUDA device the phase's peak memory is
        recorded apart from the rest of the run."""
        t = time.perf_counter()
        self._fold()
        self._open.append(name)
        done = {"items": 0}
        try:
            yield done
        except BaseException as exc:
            if self._raised[0] != id(exc):  # the innermost phase sets it first; the outer ones keep it
                self._raised = (id(exc), name)
            raise
        finally:
            inner = self._fold()
            self._open.pop()
            if self._open and inner is not None:  # the outer phase held this memory too
                self._record(self._open[-1], inner)
            self.add(name, time.perf_counter() - t, done["items"])

    @property
    def current(self) -> str:
        """The innermost phase open now (OUTSIDE_PHASES between phases: the steps, mostly)."""
        return self._open[-1] if self._open else OUTSIDE_PHASES

    def phase_of(self, exc: BaseException) -> str:
        """The innermost phase `exc` was raised in (OUTSIDE_PHASES where it came from no phase)."""
        return self._raised[1] if self._raised[0] == id(exc) else self.current

    def _read_peak(self) -> tuple[int, int] | None:
        """The peak (allocated, reserved) bytes since the last read, restarting the count; None off CUDA."""
        if self.memory is not None:
            return self.memory()
        if self.device is None or getattr(self.device, "type", "") != "cuda":
            return None
        import torch

        peak = torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def _record(self, name: str, peak: tuple[int, int]) -> None:
        old = self.peaks.get(name, (0, 0))
        self.peaks[name] = (max(old[0], peak[0]), max(old[1], peak[1]))

    def _fold(self) -> tuple[int, int] | None:
        """Give the peak since the last fold to the phase open now (OUTSIDE_PHASES when none is)."""
        peak = self._read_peak()
        if peak is not None:
            self._record(self.current, peak)
        return peak

    def add(self, name: str, seconds: float, items: int = 0) -> None:
        """Add `seconds` to phase `name`; `items` done in them give the phase a rate (items/s)."""
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1
        if items:
            self.rates[name] = items / max(seconds, 1e-9)

    def step(self, seconds: float, shapes: list[Hashable]) -> bool:
        """Record one optimizer step that ran micro-batches of `shapes`; True when one of them is new (its first
        step pays for compiling that shape, where anything compiles)."""
        new = [s for s in shapes if s not in self._seen]
        self._seen.update(new)
        (self.first_of_shape if new else self.step_times).append(seconds)
        return bool(new)

    def summary(self, device=None) -> dict[str, Any]:
        """The phase table as a JSON-ready dict (with peak GPU memory when `device` is CUDA)."""
        out: dict[str, Any] = {f"{k}_s": round(v, 3) for k, v in self.phases.items()}
        out.update({f"{k}_per_s": round(v, 2) for k, v in self.rates.items()})
        out.update({f"{k}_count": n for k, n in self.counts.items() if n > 1 or k in ("validation", "checkpoint")})
        out["steps"] = len(self.step_times) + len(self.first_of_shape)
        out["step_shapes"] = len(self._seen)
        out["first_steps_of_shapes_s"] = round(sum(self.first_of_shape), 3)
        out["steady_s_per_step"] = round(statistics.median(self.step_times), 4) if self.step_times else None
        out["steps_s"] = round(sum(self.step_times) + sum(self.first_of_shape), 3)
        out["total_s"] = round(time.perf_counter() - self.started, 3)
        if device is not None and self.device is None:
            self.device = device
        self._fold()
        if self.peaks:
            out["peak_gpu_allocated_gib"] = round(max(a for a, _ in self.peaks.values()) / 2**30, 2)
            out["peak_gpu_reserved_gib"] = round(max(r for _, r in self.peaks.values()) / 2**30, 2)
            out["peak_gpu_gib_by_phase"] = {k: round(a / 2**30, 2) for k, (a, _) in self.peaks.items()}
        if device is not None and getattr(device, "type", "") == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info(device)
            # the CUDA context and the libraries' own workspaces: on the card, but not in PyTorch's allocator
            out["outside_allocator_gib"] = round((total - free - torch.cuda.memory_reserved(device)) / 2**30, 2)
        return out

"""What every benchmark prints and records about the machine it ran on (imported by the scripts beside it)."""

from __future__ import annotations

import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path

# the checkout's packages, for a benchmark run as `python benchmarks/X.py` without installing them
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def usable_cores() -> int:
    """Cores this process may run on (a Slurm job's or a container's cpuset), not the host's count."""
    from kontext_data.workers import available_cpus

    return available_cpus()


def machine_info() -> dict:
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_file(benchmark: str, info: dict, suffix: str = "") -> Path:
    """Where a GPU benchmark writes its report unless --out says otherwise (the folder is made):
    benchmarks/results/<benchmark>-<GPU name, or cpu>-<today>[<suffix>].json, e.g.
    full_run-NVIDIA_H200-2026-12-05-k.json. The card is in the name so that figures from different cards are never
    read as one series."""
    from datetime import date

    label = str(info.get("gpu", "cpu")).replace(" ", "_")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR / f"{benchmark}-{label}-{date.today().isoformat()}{suffix}.json"

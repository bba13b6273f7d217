"""Where a measurement came from: the code's git commit, the package versions and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

PACKAGES = ("vtoken", "torch", "transformers", "numpy", "accelerate")
ROOT = Path(__file__).resolve().parents[2]


def git_state(root: Path = ROOT) -> dict[str, object]:
    """``{"commit": sha or None, "dirty": [tracked files changed since the commit]}`` of ``root``."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": []}
    return {"commit": commit, "dirty": dirty}


def versions() -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` (``None``: not installed) and Python's."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def cpu_name() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine(device: str = "cpu") -> str:
    """The hardware a measurement ran on: the CPU, its cores, torch's threads, and the GPU when
    ``device`` uses one."""
    cpu = (
        f"{cpu_name()}, {os.cpu_count()} CPU cores, torch {version('torch')}, "
        f"{torch.get_num_threads()} torch threads"
    )
    if device == "cpu" or not torch.cuda.is_available():
        return cpu
    gpu = torch.device(device if device.startswith("cuda") else "cuda")
    return f"{torch.cuda.get_device_name(gpu)} (CUDA {torch.version.cuda}), {cpu}"


def provenance(device: str = "cpu") -> dict[str, object]:
    """Everything above in one JSON-ready dict."""
    threads = torch.get_num_threads()
    return {**git_state(), "versions": versions(), "machine": machine(device), "threads": threads}

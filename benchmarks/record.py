"""The JSON record every benchmark writes: its runs plus the machine and library versions they ran on."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger("benchmarks")


def write_record(name: str, runs: list[dict], target: str, out: str | Path, **extra) -> Path:
    """Write ``{"benchmark", "torch", "threads", "machine", "runs", "target", **extra}`` to ``out`` (dirs made)."""
    record = {
        "benchmark": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "runs": runs,
        "target": target,
        **extra,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    log.info("wrote %s", out)
    return out

"""Models kept loaded between runs: a long-lived worker reads, builds and moves each model
to its device once, not once per exam.

A cache entry is keyed by the weight file's identity (path, size, modification time) and the
device, so `mammonode weights install` of a new file is picked up at the next run without
restarting the worker. The time spent loading is reported apart from the exam's stages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mammonode.pipeline.weights import ModelProvenance, load_model, model_file, provenance


class ModelCache:
    """Loaded models by (name, weights file, device); safe to share between threads."""

    def __init__(self) -> None:
        self._entries: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.seconds_loading = 0.0  # since the last take_seconds()

    def _key(self, name: str, weights_dir: Path, device: torch.device, variant: str) -> tuple:
        path = model_file(weights_dir, name)
        stat = path.stat() if path.exists() else None
        return (name, str(path), stat and (stat.st_size, stat.st_mtime_ns), str(device), variant)

    def model(self, name: str, weights_dir: Path, device: torch.device) -> tuple[nn.Module, ModelProvenance]:
        """The named model on ``device`` in eval mode, and its provenance."""
        return self.derived(name, weights_dir, device, "", lambda m: m)

    def derived(
        self,
        name: str,
        weights_dir: Path,
        device: torch.device,
        variant: str,
        make: Callable[[nn.Module], Any],
    ) -> tuple[Any, ModelProvenance]:
        """``make(model)`` (e.g. a prepared runner), built once per model file and ``variant``."""
        key = self._key(name, weights_dir, device, variant)
        with self._lock:
            if key not in self._entries:
                start = time.perf_counter()
                for stale in [k for k in self._entries if k[0] == name and k[3:] == key[3:]]:
                    del self._entries[stale]  # an older file of the same model
                built = make(load_model(name, weights_dir).to(device))
                self._entries[key] = (built, provenance(weights_dir, name))
                self.seconds_loading += time.perf_counter() - start
            return self._entries[key]

    def take_seconds(self) -> float:
        """Seconds spent loading since the last call (what this run paid)."""
        with self._lock:
            seconds, self.seconds_loading = self.seconds_loading, 0.0
            return seconds

    def __len__(self) -> int:
        return len(self._entries)

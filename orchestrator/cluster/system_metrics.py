"""System metrics of a worker, under MLflow's `system/` names: sampled by a background thread
(psutil for CPU and memory, torch's allocator and NVML for the GPU), averaged between reports and
sent with the epoch's metrics, so they reach MLflow through the same path. The training step is
untouched: nothing here waits on the GPU."""
from __future__ import annotations

import threading

import psutil
import torch

from orchestrator.results import SYSTEM_PREFIX


class SystemSampler:
    """Samples every `interval_s` seconds; `read()` returns the means since the last read."""

    def __init__(self, gpu: bool = False, interval_s: float = 2.0):
        self.process = psutil.Process()
        # The worker's GPU, read in its training thread (Ray set it there): the ranks of a trial
        # on one node all see the trial's GPUs, and a new thread starts on GPU 0.
        self.device = torch.cuda.current_device() if gpu else None
        self.samples: list[dict[str, float]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        psutil.cpu_percent(None)  # the first call starts psutil's interval
        self.thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True,
                                       name="system-metrics")
        self.thread.start()

    def _run(self, interval_s: float) -> None:
        while not self.stop.wait(interval_s):
            sample = self.sample()
            with self.lock:
                self.samples.append(sample)

    def sample(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        out = {"cpu_utilization_percentage": psutil.cpu_percent(None),
               "system_memory_usage_megabytes": memory.used / 2**20,
               "system_memory_usage_percentage": memory.percent,
               "process_memory_rss_megabytes": self.process.memory_info().rss / 2**20}
        if self.device is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            reserved = torch.cuda.memory_reserved(self.device)  # the allocator's count: no sync
            out["gpu_0_memory_usage_megabytes"] = reserved / 2**20
            out["gpu_0_memory_usage_percentage"] = 100 * reserved / total
            try:
                out["gpu_0_utilization_percentage"] = torch.cuda.utilization(self.device)
            except Exception:  # NVML (pynvml) is optional: no utilisation without it
                pass
        return out

    def read(self) -> dict[str, float]:
        """`system/<name>`: the mean of each metric over the samples since the last read (one
        taken now if none was)."""
        with self.lock:
            samples, self.samples = self.samples or [self.sample()], []
        return {f"{SYSTEM_PREFIX}{key}": sum(s[key] for s in samples) / len(samples)
                for key in samples[-1]}

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

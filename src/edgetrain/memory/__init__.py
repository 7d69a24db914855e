"""Memory, measured: ``measure()`` reports the per-category peak of a real step;
``peak_rss()`` the whole-process peak of a training run in a child process."""

from edgetrain.memory.measure import MemoryReport, format_bytes, measure, measure_inference
from edgetrain.memory.rss import peak_rss
from edgetrain.memory.tracker import StorageTracker, saved_for_backward_bytes, storage_bytes

__all__ = [
    "MemoryReport",
    "measure",
    "measure_inference",
    "peak_rss",
    "format_bytes",
    "StorageTracker",
    "storage_bytes",
    "saved_for_backward_bytes",
]

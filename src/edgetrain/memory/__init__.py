"""Memory, measured: ``measure()`` reports the per-category peak of a real step;
``child_peak_rss()`` the whole-process peak of a child process (the child that trains a
recipe is edgetrain.bench.rss_run)."""

from edgetrain.memory.measure import MemoryReport, format_bytes, measure, measure_inference
from edgetrain.memory.rss import child_peak_rss, maxrss_bytes
from edgetrain.memory.tracker import StorageTracker, saved_for_backward_bytes, storage_bytes

__all__ = [
    "MemoryReport",
    "measure",
    "measure_inference",
    "child_peak_rss",
    "maxrss_bytes",
    "format_bytes",
    "StorageTracker",
    "storage_bytes",
    "saved_for_backward_bytes",
]

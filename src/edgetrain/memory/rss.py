"""Whole-process peak memory: the peak resident set size of a child process.

:func:`child_peak_rss` runs a command in a fresh process and returns its peak resident set
size (``ru_maxrss`` of the child, read by ``os.wait4`` when it exits: the high-water mark of
the whole process, whatever it ran) and its output. :func:`maxrss_bytes` is the same
high-water mark of the calling process so far, for a child that reports intermediate
figures itself (e.g. after loading, before training).

Why through a launcher. Linux keeps a process's ``ru_maxrss`` across ``execve``: a child
forked (or vforked, as ``subprocess`` does) from a big parent starts with the parent's
high-water mark (measured: ``python -c pass`` started from a process that holds 400 MiB
reports 413 MiB). So the command runs as the grandchild of a small launcher (a fresh
``python -c``, a few MiB): its high-water mark starts from the launcher's, and the
launcher reads it with ``os.wait4``. The figure is then free of whatever the parent
allocated.

:func:`fix_mmap_threshold` keeps freed activation memory from staying in the process,
at a cost in time. glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes
(128 KiB at start) by its own ``mmap``, returned to the system when freed; but the
threshold is dynamic: each free of such a block raises it to that block's size (up to
32 MiB), so after the first forward pass the MiB-sized activations of later passes come
from the heap, and a heap fragmented by many passes is not given back. Measured on
minilm-polarity (batch 32, 30 no-grad forwards over different batches): the resident set
grows from 666 to 729 MiB (``malloc_trim`` gives it back: 612); with the threshold fixed
at 128 KiB it stays at 641 MiB. The price: every large tensor is a fresh mapping whose
pages fault in zeroed, and the forward took 1.2-1.5x as long (benchmarks/process_rss.py).
So it is an option, not the default: ``EDGETRAIN_MALLOC=lean edgetrain ...`` turns it on
for the command line, a library caller calls this function.

:func:`keep_freed_memory` is the opposite trade: the mmap threshold at its 32 MiB maximum
and the trim threshold at 1 GiB, so freed blocks stay in the heap and the next pass
reuses pages already resident instead of faulting fresh ones in. It pays where a step
allocates many multi-MiB temporaries: the fixed-point simulator (int64/float64 tensors of
every activation) ran the integer ViT's forward in 0.61x the time (0.227 -> 0.139 s, 64
images, one thread, 4 interleaved rounds) and a ``fixed_point_zo`` step in 0.66x, with
float steps (mezo, full_bp on the ViT) unchanged and the peak RSS within 3-7%
(session 12, issue 19). ``EDGETRAIN_MALLOC=fast`` turns it on for the command line;
``edgetrain compare``, which runs the fixed-point presets, turns it on unless
``EDGETRAIN_MALLOC`` is set (``default`` keeps glibc's own behaviour).

This module knows nothing of tasks or training: ``edgetrain.bench.rss_run`` is the child
that loads a task and trains a recipe (``edgetrain measure --rss``).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ChildRSS",
    "child_peak_rss",
    "fix_mmap_threshold",
    "keep_freed_memory",
    "maxrss_bytes",
]

# Linux reports ru_maxrss in KiB, macOS in bytes.
_MAXRSS_SCALE = 1 if sys.platform == "darwin" else 1024


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems


def _mallopt(settings: list[tuple[int, int]]) -> bool:
    """glibc ``mallopt`` for each ``(parameter, value)``; True if the C library took them
    all, False where there is no glibc ``mallopt`` (macOS, musl): nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all([mallopt(param, int(value)) == 1 for param, value in settings])


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Fix glibc's ``M_MMAP_THRESHOLD`` at ``nbytes`` (its start value by default), which
    also turns off its dynamic raising: every allocation that large is mapped on its own
    and unmapped when freed. True if the C library took it."""
    return _mallopt([(_M_MMAP_THRESHOLD, nbytes)])


def keep_freed_memory() -> bool:
    """Keep freed memory in the process for reuse (module doc): ``M_MMAP_THRESHOLD`` at its
    32 MiB maximum, ``M_TRIM_THRESHOLD`` at 1 GiB. True if the C library took both."""
    return _mallopt([(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 1 << 30)])


def maxrss_bytes() -> int:
    """The calling process's peak resident set size so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_SCALE


@dataclass(frozen=True)
class ChildRSS:
    """What :func:`child_peak_rss` measured: the child's peak RSS in bytes, its output."""

    peak_rss: int
    stdout: str
    stderr: str


# argv: [result file, command...]. Runs the command, waits for it with os.wait4, writes its
# ru_maxrss (in the platform's unit) to the result file, exits with its exit status.
_LAUNCHER = """\
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(code if code >= 0 else 128 - code)
"""


def child_peak_rss(argv: Sequence[str], *, timeout: float = 600) -> ChildRSS:
    """Run ``argv`` (``argv[0]`` is the program, e.g. ``sys.executable``) in a fresh
    process (the grandchild of a small launcher, see the module docstring) and return its
    peak resident set size at exit with its stdout and stderr. Raises RuntimeError (with
    the end of its stderr) if it exits with a non-zero status, TimeoutError (after
    killing it) if it runs longer than ``timeout`` seconds."""
    if not argv:
        raise ValueError("child_peak_rss needs a command, got an empty argv")
    with tempfile.TemporaryDirectory(prefix="edgetrain-rss-") as tmp:
        result = os.path.join(tmp, "maxrss")
        with (
            open(os.path.join(tmp, "out"), "w+") as out,
            open(os.path.join(tmp, "err"), "w+") as err,
        ):
            cmd = [sys.executable, "-c", _LAUNCHER, result, *argv]
            # A session of its own, so that a timeout kills the launcher and the command.
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except BaseException as exc:  # a timeout, or the parent interrupted: stop both
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if isinstance(exc, subprocess.TimeoutExpired):
                    raise TimeoutError(f"{argv[0]} ran longer than {timeout} s; killed") from None
                raise
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if code != 0:
            raise RuntimeError(
                f"Child process {' '.join(argv[:3])} ... failed ({code}): {stderr[-2000:]}"
            )
        with open(result) as fh:
            peak = int(fh.read()) * _MAXRSS_SCALE
    return ChildRSS(peak, stdout, stderr)

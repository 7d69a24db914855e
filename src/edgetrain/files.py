"""Writing and reading the files edgetrain makes, so that a crash, a truncated copy or a
file from someone else can never cost a run or run code.

* ``atomic_torch_save(obj, path)``: a temporary file, fsync, an atomic rename: a reader
  sees the old file or the new one, never half of one.
* ``load_tensor_file(path, what)``: ``torch.load(weights_only=True)`` (tensors and plain
  containers only: nothing is unpickled that could run code), with one-line errors a user
  can act on: :class:`UnreadableFileError` for a truncated or corrupt file,
  :class:`UntrustedFileError` for a file that is not a tensor-only torch file (another
  format, or a pickle that would import or call something). Never follow torch's advice
  to retry with ``weights_only=False`` for a file you did not write.
* ``cache_dir()``: where edgetrain keeps what it can rebuild (pretrained models, linear
  probes, downloaded data, plan caches); ``load_cache(path, what)``: a cache file's
  contents, or None (with a warning) when it is missing or cannot be trusted.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from edgetrain.errors import ConfigError

__all__ = [
    "atomic_torch_save",
    "load_tensor_file",
    "UnreadableFileError",
    "UntrustedFileError",
    "cache_dir",
    "load_cache",
]


_ZIP_MAGIC = b"PK\x03\x04"


class UnreadableFileError(ConfigError):
    """A file edgetrain wrote that cannot be read back (truncated, corrupt)."""


class UntrustedFileError(ConfigError):
    """A file that is not what edgetrain writes; refused without unpickling it."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_tensor_file(path: str | os.PathLike, what: str, advice: str = "") -> Any:
    """The contents of a tensor-only torch file, or a one-line error naming ``path``, what
    it should have been (``what``, e.g. "edgetrain checkpoint") and ``advice``."""
    path = Path(path)
    tail = f" {advice}" if advice else ""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != _ZIP_MAGIC:
        # torch.save writes a zip archive; anything else (the legacy format, a bare pickle,
        # another file) would go through a pickle reader: refuse it before that.
        raise UntrustedFileError(
            f"{path} is not an {what}: not a torch zip file, refused without unpickling.{tail}"
        )
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        # weights_only refused an object outside its allow-list: code it would run.
        # No retry without it.
        raise UntrustedFileError(
            f"{path} is not an {what}: it holds Python objects beyond tensors, refused "
            f"without unpickling.{tail}"
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse a zip is a corrupt file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnreadableFileError(
            f"{path} is unreadable (truncated or corrupt: {first}).{tail}"
        ) from None


def cache_dir() -> Path:
    """Where pretrained models and plan caches live: ``$EDGETRAIN_CACHE`` or
    ``~/.cache/edgetrain``."""
    root = os.environ.get("EDGETRAIN_CACHE") or Path.home() / ".cache" / "edgetrain"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_cache(path: Path, what: str) -> dict[str, Any] | None:
    """A cache file's contents, or None when there is none or it cannot be trusted (then
    it is rebuilt, with a warning; it is never unpickled)."""
    if not path.exists():
        return None
    try:
        return load_tensor_file(path, what)
    except (UnreadableFileError, UntrustedFileError) as err:
        warnings.warn(f"{err} Rebuilding it.", RuntimeWarning, stacklevel=3)
        return None

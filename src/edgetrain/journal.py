"""Append-only journal of a zeroth-order run, and bit-exact replay from it.

A ZO step changes the weights by a function of (seed, projected gradient(s), lr, ...):
MeZO (Malladi et al. 2023, Sec. 2 "storage-efficient checkpointing") notes that a whole
fine-tuning run is therefore recoverable from the base weights and those few numbers per
step. The journal stores them:

* line 1, the header: format/version, the recipe (``Recipe.to_dict``), the run seed, the
  trainable parameter names, and the optimizer description (``ZOSGD.describe``: run-wide
  settings, param groups by name, Sparse MeZO thresholds), plus torch's version;
* then one line per step: ``ZORecord.to_dict()``.

Each line is ``<crc32 as 8 hex digits> <json>\\n``; the CRC covers the JSON bytes. Every
record is flushed when written (``fsync=True`` also forces it to disk, which a process
kill does not need). ``read_journal`` drops a truncated or corrupt *last* line with a
warning (a run killed mid-write) and raises ``JournalCorruptError`` naming the record for
any other bad line. ``replay(model, path)`` rebuilds the optimizer from the header and
applies every record with ``ZOSGD.apply_record``: the same arithmetic as training, so the
result equals the trained weights bit for bit (same device and torch build).
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.optim.zo import ZOSGD, ZORecord
from edgetrain.recipe import Recipe

__all__ = [
    "JOURNAL_FORMAT",
    "JournalCorruptError",
    "Journal",
    "JournalWriter",
    "read_journal",
    "replay",
    "optimizer_from_header",
]

JOURNAL_FORMAT = "edgetrain-zo-journal"
JOURNAL_VERSION = 1


class JournalCorruptError(ConfigError):
    """A journal line other than the last one fails its CRC or does not parse."""


@dataclass
class Journal:
    header: dict[str, Any]
    records: list[ZORecord]
    valid_bytes: int
    """Length of the valid prefix of the file (where an append must start)."""


def _encode(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def _decode(line: bytes) -> dict[str, Any]:
    if not line.endswith(b"\n"):
        raise ValueError("line is truncated (no newline)")
    crc_text, sep, payload = line[:-1].partition(b" ")
    if not sep or len(crc_text) != 8:
        raise ValueError("line has no CRC prefix")
    if int(crc_text, 16) != zlib.crc32(payload):
        raise ValueError("CRC mismatch")
    return json.loads(payload)


def read_journal(path: str | os.PathLike) -> Journal:
    """Header and records of a journal. A bad last line is dropped with a warning."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    if not lines:
        raise JournalCorruptError(f"{path}: empty journal (no header)")
    try:
        header = _decode(lines[0])
    except ValueError as err:
        raise JournalCorruptError(f"{path}: header line is corrupt ({err})") from err
    if header.get("format") != JOURNAL_FORMAT:
        raise JournalCorruptError(
            f"{path}: not an edgetrain ZO journal (format {header.get('format')!r})"
        )
    records: list[ZORecord] = []
    offset = len(lines[0])
    for number, line in enumerate(lines[1:], start=1):
        try:
            record = ZORecord.from_dict(_decode(line))
        except (ValueError, TypeError, KeyError) as err:
            if number == len(lines) - 1:
                warnings.warn(
                    f"{path}: dropping record {number} (the last line: {err}); "
                    "the run was probably interrupted while writing it",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            raise JournalCorruptError(
                f"{path}: record {number} (line {number + 1}) is corrupt: {err}"
            ) from err
        if record.step != len(records):
            raise JournalCorruptError(
                f"{path}: record {number} is step {record.step}, expected step {len(records)}"
            )
        records.append(record)
        offset += len(line)
    return Journal(header, records, offset)


class JournalWriter:
    """Appends one record per step, flushed each time.

    A new (or empty) file gets ``header`` as its first line. An existing journal is
    continued: its header must equal ``header``, and a dropped bad last line is cut off
    before appending. ``next_step`` is the step the next record must carry.
    """

    def __init__(
        self, path: str | os.PathLike, header: dict[str, Any], *, fsync: bool = False
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        header = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, **header}
        if self.path.exists() and self.path.stat().st_size > 0:
            journal = read_journal(self.path)
            saved, mine = _normalise(journal.header), _normalise(header)
            named = _recipe_differences(saved, mine)
            if saved != mine:
                differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
                if "recipe" in differ and named:
                    differ[differ.index("recipe")] = f"recipe ({'; '.join(named)})"
                raise ConfigError(
                    f"{self.path} is the journal of another run (its header differs in "
                    f"{', '.join(differ)}); choose another path or resume with that run's "
                    "settings (only the number of steps may change)"
                )
            self._file = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
            self._file.truncate(journal.valid_bytes)
            self._file.seek(journal.valid_bytes)
            self.next_step = len(journal.records)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            self._write(header)
            self.next_step = 0

    def _write(self, obj: dict[str, Any]) -> None:
        self._file.write(_encode(obj))
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def append(self, record: ZORecord | dict[str, Any]) -> None:
        data = record.to_dict() if isinstance(record, ZORecord) else dict(record)
        if data["step"] != self.next_step:
            raise ValueError(
                f"Journal {self.path} expects step {self.next_step} next, got {data['step']}"
            )
        self._write(data)
        self.next_step += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _normalise(obj: Any) -> Any:
    """JSON round trip (tuples become lists) so headers compare as written."""
    return json.loads(json.dumps(obj))


def _recipe_differences(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """The recipe fields in which two headers differ (``Recipe.identity_differences``:
    a field added since ``saved`` was written reads as its default). Where they differ
    in nothing but that, ``saved["recipe"]`` is set to ``mine["recipe"]``, so the
    header comparison accepts a journal written before a recipe field existed."""
    if not (isinstance(saved.get("recipe"), dict) and isinstance(mine.get("recipe"), dict)):
        return []
    try:
        named = Recipe.from_dict(mine["recipe"]).identity_differences(saved["recipe"])
    except (TypeError, ValueError):
        return []
    if not named:
        saved["recipe"] = mine["recipe"]
    return named


def optimizer_from_header(model: nn.Module, header: dict[str, Any]) -> ZOSGD:
    """The journal's optimizer, rebuilt over ``model``'s parameters (by name)."""
    named = dict(model.named_parameters())
    for name in header["param_names"]:
        if name not in named:
            raise KeyError(f"The model has no parameter {name!r} named in the journal")
    return ZOSGD.from_description(named, header["optimizer"])


def replay(model: nn.Module, journal_path: str | os.PathLike) -> ZOSGD:
    """Apply every record of the journal to ``model`` (which must hold the run's base
    weights). Returns the optimizer, positioned after the last record."""
    journal = read_journal(journal_path)
    optimizer = optimizer_from_header(model, journal.header)
    with torch.no_grad():
        for record in journal.records:
            optimizer.apply_record(record)
    return optimizer

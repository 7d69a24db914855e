"""Layer-streamed zeroth-order training with the weights on disk (issue 22): whole-process
peak RSS against the model's weight bytes, and step time against in-memory MeZO.

Every figure comes from a fresh process (``edgetrain.memory.rss.child_peak_rss``), one per
(model, mode), which prints its own ``VmHWM`` (/proc/self/status) before it would close
the estimator (closing an offloaded run gives the model its weights back, which is not
training): ``none`` (in-memory MeZO), ``cpu`` (the streamed schedule on the weights'
own storage: on this CPU-only machine the no-copy path; its cost over ``none`` is the
schedule's), ``disk`` (the trainable weights in the safetensors file, one unit in RAM).
The ``disk`` process builds its model on the meta device and allocates it with
``to_empty`` (untouched pages are not resident) and takes the weights from the file
written beforehand (``ZO(..., offload_from_file=True)``), so the whole model is never in
its memory. The file is written just before the run, so it is in the OS page cache; what
the page cache holds of it after the run is reported (``fincore``), apart from RSS.
The import floors are processes that only import what the runs import.

Models (random weights): ``minilm`` and ``bert-large``, HF ``BertModel`` encoders of
MiniLM-L6's shape (6 x 384, 22.7M parameters) and BERT-large's (24 x 1024, 335M) with
edgetrain's classifier head (benchmarks/scaling.py's models); ``vit-large``, the
project's ViT with BERT-large's 24 encoder layers (hidden 1024, 16 heads, FFN 4096; 302M
parameters) on 28 x 28 images, without a vocabulary embedding and without transformers;
``vit-xl``, the same with 48 layers (604M parameters): the peak of a disk run is the
process's floor plus one unit, so the weights / peak ratio grows with depth.

Estimators (``--estimators``): ``mezo`` (MeZO, SGD), ``zo_momentum`` (MeZO with heavy-ball
momentum: the momentum buffer streams beside the weights, twice the I/O) and
``elastic_zo`` (ElasticZO: the
blocks before the last one and the embeddings by SPSA, the last block and the head by
backprop with Adam, as the preset's cut 3 of 4; only the front streams, the tail stays
resident, so its weights, gradients, Adam moments and activations add to the peak). The
``disk`` ElasticZO process takes its front from the file and its tail's weights from a
saved copy (``tail.pt``), never holding the front in memory.

Usage::

    python benchmarks/offload.py [--models minilm,bert-large,vit-large] [--steps 3]
        [--batch 2] [--seq 64] [--dir /tmp/edgetrain-offload] [--estimators mezo,elastic_zo]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BERT = {
    "minilm": (6, 384, 12, 1536),
    "bert-large": (24, 1024, 16, 4096),
}
VIT = {
    "vit-large": dict(dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "vit-xl": dict(dim=1024, depth=48, num_heads=16, mlp_ratio=4.0),
}
VOCAB = 30522
MODES = ("none", "cpu", "disk")


def build_model(name: str, seed: int = 0, *, meta: bool = False) -> torch.nn.Module:
    """The model ``name`` with seeded random weights (``meta``: on the meta device)."""
    from edgetrain.seeding import seeded_global_rng

    with seeded_global_rng(seed), torch.device("meta" if meta else "cpu"):
        if name in VIT:
            from edgetrain.models.vit import ViT

            return ViT(**VIT[name])
        import transformers

        from edgetrain.integrations.hf import HFClassifier

        layers, hidden, heads, ffn = BERT[name]
        config = transformers.BertConfig(
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            intermediate_size=ffn,
            vocab_size=VOCAB,
            max_position_embeddings=512,
        )
        return HFClassifier(transformers.BertModel(config, add_pooling_layer=False), 2)


def make_batch(name: str, batch: int, seq: int):
    gen = torch.Generator().manual_seed(1)
    if name in VIT:
        return torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,))
    return {
        "input_ids": torch.randint(1, VOCAB, (batch, seq), generator=gen),  # (B, T)
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),  # (B, T)
        "labels": torch.randint(0, 2, (batch,), generator=gen),  # (B,)
    }


ESTIMATORS = ("mezo", "zo_momentum", "elastic_zo")


def depth(name: str) -> int:
    return VIT[name]["depth"] if name in VIT else BERT[name][0]


def recipe(mode: str, directory: str, estimator: str = "mezo", name: str = "minilm"):
    from edgetrain.recipe import Estimator, Optimizer, Recipe

    if estimator == "elastic_zo":
        return Recipe(
            estimator=Estimator(
                kind="hybrid",
                cut=depth(name) - 1,  # the last block and the head by backprop
                eps=1e-3,
                zo_lr=1e-6,
                offload=mode,
                offload_dir=directory if mode == "disk" else None,
            ),
            optimizer=Optimizer(kind="adam", lr=1e-5),
        )
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    optimizer = "momentum" if estimator == "zo_momentum" else "sgd"
    return Recipe(
        estimator=Estimator(
            kind="zo",
            eps=1e-3,
            offload=mode,
            offload_dir=directory if mode == "disk" else None,
        ),
        optimizer=Optimizer(kind=optimizer, lr=1e-6),
    )


def _status() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def prepare(name: str, directory: Path, estimator: str = "mezo") -> None:
    """Write the offload file of ``name``'s seeded weights (and its buffers; ElasticZO:
    its resident tail's weights too)."""
    from edgetrain.estimators import build

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    model = build_model(name)
    torch.save(dict(model.named_buffers()), directory / "buffers.pt")
    est = build(model, recipe("disk", str(directory), estimator, name))
    if estimator == "elastic_zo":
        torch.save({n: p.detach() for n, p in est.tail_named}, directory / "tail.pt")
    est.offload.stream()
    est.offload.store.close()


def child(
    mode: str, name: str, directory: str, steps: int, batch: int, seq: int, estimator: str
) -> None:
    torch.set_num_threads(1)
    from edgetrain.estimators import build
    from edgetrain.estimators.hybrid import ElasticZO
    from edgetrain.estimators.zo import ZO

    run = recipe(mode, directory, estimator, name)
    if mode == "disk":
        model = build_model(name, meta=True).to_empty(device="cpu")  # untouched storage
        buffers = torch.load(Path(directory) / "buffers.pt", weights_only=True)
        for key, value in buffers.items():
            owner, _, leaf = key.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, value, persistent=False)
        if estimator == "elastic_zo":
            params = dict(model.named_parameters())
            with torch.no_grad():
                for key, value in torch.load(Path(directory) / "tail.pt").items():
                    params[key].copy_(value)  # the resident tail; the front is never read
            est = ElasticZO(model, run, offload_from_file=True)
        else:
            est = ZO(model, run, offload_from_file=True)
    else:
        model = build_model(name)
        est = build(model, run)
    weight_bytes = sum(p.numel() * p.element_size() for p in est.params)
    streamed = est.front_params if estimator == "elastic_zo" else est.params
    streamed_bytes = sum(p.numel() * p.element_size() for p in streamed)
    data = make_batch(name, batch, seq)
    est.step(data)  # warm-up
    io0 = est.offload.io_bytes if est.offload is not None else (0, 0)
    times = [est.step(data).seconds for _ in range(steps)]
    io1 = est.offload.io_bytes if est.offload is not None else (0, 0)
    status = _status()
    print(
        json.dumps(
            {
                "median_s": statistics.median(times),
                "times": times,
                "read_per_step": (io1[0] - io0[0]) / steps,
                "written_per_step": (io1[1] - io0[1]) / steps,
                "weight_bytes": weight_bytes,
                "streamed_bytes": streamed_bytes,
                "params": sum(p.numel() for p in est.params),
                "largest_unit_bytes": (
                    max(u.numel for u in est.offload.units) * 4 if est.offload else 0
                ),
                **status,
            }
        ),
        flush=True,
    )
    os._exit(0)  # before close(): the peak is training's


_FLOORS = {
    "torch + edgetrain": "import torch, edgetrain.estimators.zo",
    "torch + edgetrain + transformers' BERT": (
        "import torch, edgetrain.estimators.zo, edgetrain.integrations.hf\n"
        "from transformers.models.bert.modeling_bert import BertModel"
    ),
}
"""Processes that only import what the runs import (transformers imports its models
lazily: the BERT modeling module is what a BERT run loads)."""


def page_cache_bytes(path: Path) -> int | None:
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def main() -> None:
    from edgetrain.estimators.offload import FILE_NAME
    from edgetrain.memory.rss import child_peak_rss

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,bert-large,vit-large")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dir", default="/tmp/edgetrain-offload")
    parser.add_argument("--estimators", default="mezo")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, name, directory, steps, batch, seq, estimator = args.child
        child(mode, name, directory, int(steps), int(batch), int(seq), estimator)
        return
    script = os.path.abspath(__file__)
    for label, code in _FLOORS.items():
        floor = child_peak_rss([sys.executable, "-c", code]).peak_rss
        print(f"import floor ({label}): {floor / 2**20:.0f} MiB")
    rows = []
    for name, estimator in [
        (n, e) for n in args.models.split(",") for e in args.estimators.split(",")
    ]:
        directory = Path(args.dir) / name
        results = {}
        for mode in args.modes.split(","):
            if mode == "disk":
                start = time.perf_counter()
                prepare(name, directory, estimator)
                print(f"{name}: wrote the file in {time.perf_counter() - start:.1f} s")
            argv = [sys.executable, script, "--child", mode, name, str(directory)]
            argv += [str(args.steps), str(args.batch), str(args.seq), estimator]
            out = child_peak_rss(argv, timeout=3600)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["peak_rss"] = out.peak_rss
            if mode == "disk":
                result["file_bytes"] = (directory / FILE_NAME).stat().st_size
                result["page_cache"] = page_cache_bytes(directory / FILE_NAME)
            results[mode] = result
            print(name, estimator, mode, json.dumps(result), file=sys.stderr, flush=True)
        rows.append((name, estimator, results))
    print(
        f"\nbatch {args.batch}"
        + ("" if "vit-large" == args.models else f" x {args.seq} tokens (BERT)")
        + f", {args.steps} timed steps after one warm-up, 1 thread, medians\n"
    )
    print(
        "| model | estimator | params | weight bytes (streamed) | mode | peak RSS (VmHWM) "
        "| weights / peak RSS | step | vs in-memory | I/O per step (read + written) "
        "| file in page cache |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, estimator, results in rows:
        base = results.get("none", {}).get("median_s")
        for mode, r in results.items():
            peak = r["VmHWM"]
            ratio = f"{r['median_s'] / base:.2f}x" if base else "-"
            io = r["read_per_step"] + r["written_per_step"]
            cache = r.get("page_cache")
            cache_text = "-" if cache is None else f"{cache / 2**20:.0f} MiB"
            print(
                f"| {name} | {estimator} | {r['params'] / 1e6:.1f}M "
                f"| {r['weight_bytes'] / 2**20:.0f} MiB ({r['streamed_bytes'] / 2**20:.0f}) "
                f"| {mode} | {peak / 2**20:.0f} MiB | {r['weight_bytes'] / peak:.2f}x "
                f"| {r['median_s']:.2f} s | {ratio} | {io / 2**20:.0f} MiB | {cache_text} |"
            )


if __name__ == "__main__":
    main()

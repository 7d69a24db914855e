"""The named recipes of the papers, in one place.

Each preset is a function returning a :class:`~edgetrain.recipe.Recipe`, registered with
``@preset``. Its docstring cites the paper and says where its defaults come from (tuned on
the built-in ``mnist-to-digits`` task; see docs/methods.md). ``get(name, **overrides)``
returns the recipe with fields replaced (``"axis.field"`` keys reach into an axis).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgetrain._registry import Registry
from edgetrain.recipe import Backward, Estimator, Numerics, Optimizer, Recipe, Scope

__all__ = ["names", "get", "preset"]

_PRESETS: Registry = Registry("preset")


def preset(fn: Callable[[], Recipe]) -> Callable[[], Recipe]:
    """Register ``fn`` as a preset under its function name."""
    _PRESETS.register(fn.__name__, fn)
    return fn


def names() -> list[str]:
    """Every registered preset name, in registration order."""
    return _PRESETS.names()


def get(name: str, **overrides: Any) -> Recipe:
    """The preset ``name`` with ``overrides`` applied (see ``Recipe.replace``)."""
    recipe = _PRESETS.get(name)()
    return recipe.replace(**overrides) if overrides else recipe


# --- backprop baselines (foundation) ----------------------------------------------------


@preset
def full_bp() -> Recipe:
    """Full backprop with Adam on every parameter: the baseline everything is measured
    against. lr 1e-3 is Adam's usual default; it adapts the pretrained model in ~150 steps."""
    return Recipe(
        name="full_bp",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="Full backprop, Adam, all parameters",
    )


@preset
def last_layers() -> Recipe:
    """Backprop through the last block and the head only (the classic transfer-learning
    baseline). The frozen front stores no activations."""
    return Recipe(
        name="last_layers",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="last_blocks", k=1, include_head=True),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="Backprop, Adam, last block + head",
    )


@preset
def bias_only() -> Recipe:
    """Bias-only fine-tuning (BitFit, Ben Zaken et al. 2022; TinyTL, Cai et al. 2020):
    only one-dimensional tensors train. Weights need no gradient, so no layer keeps its
    input for a weight gradient. Higher lr: biases move slowly."""
    return Recipe(
        name="bias_only",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="bias"),
        optimizer=Optimizer(kind="adam", lr=1e-2),
        steps=150,
        batch_size=32,
        description="Backprop, Adam, biases and norm parameters only",
    )


# --- zeroth-order: MeZO and its family (issue 3) ----------------------------------------
# Defaults are tuned on mnist-to-digits with the ViT (the compare default); the sweep is in
# docs/methods.md.


def _zo(name: str, description: str, optimizer: Optimizer, **estimator) -> Recipe:
    return Recipe(
        name=name,
        estimator=Estimator(kind="zo", **{"eps": 1e-3, **estimator}),
        scope=Scope(kind="all"),
        optimizer=optimizer,
        steps=1000,
        batch_size=32,
        description=description,
    )


@preset
def mezo() -> Recipe:
    """MeZO (Malladi et al. 2023): two-sided SPSA with one Gaussian direction per step,
    z regenerated from the step seed (never stored), ZO-SGD. No weight decay; given one,
    biases and norm weights are not decayed (``decay_matrices_only``, the default), as
    MeZO's ``zo_update`` (large_models/trainer.py) skips them."""
    return _zo("mezo", "MeZO: two-sided SPSA, Gaussian z, ZO-SGD", Optimizer(kind="sgd", lr=3e-5))


@preset
def sparse_mezo() -> Recipe:
    """Sparse MeZO (Liu et al. 2024): perturb and update only the small-magnitude weights
    (per-tensor threshold at the 25th percentile of |w|, set once; mask recomputed from
    the current weights every step)."""
    return _zo(
        "sparse_mezo",
        "Sparse MeZO: perturb the 25% smallest-|w| of each tensor",
        Optimizer(kind="sgd", lr=3e-4),
        sparsity=0.75,
        mask_on="abs",
    )


@preset
def zo_sign() -> Recipe:
    """ZO-SignSGD (Liu et al. 2019, "signSGD via Zeroth-Order Oracle"; ZO-Bench's
    ZO-SGD-Sign): theta -= lr * sign(g_hat), the sign of every coordinate of the SPSA
    estimate g_hat = g z (``sign_rule="elementwise"``). That is the algorithm of Liu et al.,
    and the rule these defaults were tuned with (docs/methods.md). ZO-Bench's code runs
    another rule for ``zo_sign_opt``, theta -= lr * sign(g) * z (trainer.py ``zo_step``; the
    elementwise form is there, commented out): a ZO-SGD step with the scalar g replaced by
    its sign, lr * |z| long along +-z, available as ``sign_rule="projected"``; its lr
    needs its own tuning."""
    return _zo("zo_sign", "ZO-SignSGD", Optimizer(kind="sign", lr=1e-3, sign_rule="elementwise"))


@preset
def zo_momentum() -> Recipe:
    """ZO-SGD with heavy-ball momentum (ZO-Bench's ZO-SGD-MMT, Zhang et al. 2024: torch's
    SGD with momentum on the gradient g z); keeps a model-size momentum buffer."""
    return _zo("zo_momentum", "ZO-SGD with momentum 0.9", Optimizer(kind="momentum", lr=3e-6))


@preset
def zo_adam() -> Recipe:
    """ZO-Adam (ZO-AdaMM, Chen et al. 2019; ZO-Bench: torch's Adam on the gradient g z);
    keeps two model-size moment buffers."""
    return _zo("zo_adam", "ZO-Adam", Optimizer(kind="adam", lr=1e-3))


@preset
def zo_cons() -> Recipe:
    """ZO-SGD-Cons (ZO-Bench): after the estimate, keep the best of theta, theta - step and
    theta + step (5 forwards per step with two-sided differences)."""
    return _zo(
        "zo_cons", "ZO-SGD-Cons: keep the best of three", Optimizer(kind="sgd", lr=3e-5), cons=True
    )


# --- cheaper backprop (issue 6) ----------------------------------------------------------


@preset
def lbp_wht() -> Recipe:
    """LBP-WHT (Yang et al., NeurIPS 2023): activations and output gradients of the ViT's
    qkv/proj/fc1/fc2 projected on the low-pass 2-D Walsh-Hadamard bases r + c < 6 of each
    8x8 token patch; only the projection is saved, gradients computed in that space."""
    return Recipe(
        name="lbp_wht",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        backward=Backward(kind="wht", wht_k=6, wht_selection="lp_tri"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="LBP-WHT low-rank backprop, lp_tri k=6, Adam",
    )


@preset
def mesa() -> Recipe:
    """Mesa (Pan et al. 2021): exact forward, 8-bit saved activations with per-head /
    per-group running ranges for Linear, GELU, Softmax, LayerNorm and attention matmuls
    (HuggingFace models too: their GELU modules and attention function). Rounding to
    nearest; the reference kernel rounds stochastically (``backward.stochastic_rounding``)."""
    return Recipe(
        name="mesa",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        backward=Backward(kind="mesa", bits=8, stochastic_rounding=False),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="Backprop with 8-bit saved activations (Mesa), Adam",
    )


@preset
def galore() -> Recipe:
    """GaLore (Zhao et al. 2024): Adam moments kept in a rank-8 projection of the gradient
    of each attention and MLP Linear weight of the blocks (``galore_targets=
    "block_linear"``, as the reference's target_modules ["attn", "mlp"]; embeddings, head,
    norms and biases get plain AdamW), projector refreshed by SVD every 50 steps; scale
    1.0 so the step matches full_bp's Adam at lr 1e-3 (the paper's 0.25 goes with lr
    ~1e-2)."""
    return Recipe(
        name="galore",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(
            kind="galore",
            lr=1e-3,
            rank=8,
            update_gap=50,
            galore_scale=1.0,
            galore_targets="block_linear",
        ),
        steps=150,
        batch_size=32,
        description="Backprop, GaLore-projected AdamW (block Linears), rank 8",
    )


@preset
def lowrank_grad() -> Recipe:
    """Low-rank gradient approximation (after Gooneratne et al. 2020): each 2-D weight is
    updated as W0 + AB with Adam on the rank-8 factors, restarted every 50 steps."""
    return Recipe(
        name="lowrank_grad",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="lowrank", lr=1e-3, rank=8, update_gap=50),
        steps=150,
        batch_size=32,
        description="Backprop, Adam on rank-8 gradient factors",
    )


@preset
def checkpointed() -> Recipe:
    """Full backprop with activation checkpointing per block (torch.utils.checkpoint;
    Chen et al. 2016): saves only block inputs, recomputes each block in backward (the
    blocks' class is swapped, edgetrain.backward.checkpoint). For comparison."""
    return Recipe(
        name="checkpointed",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="all"),
        backward=Backward(kind="checkpoint"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="Full backprop with per-block activation checkpointing, Adam",
    )


# --- forward gradients (issue 4) --------------------------------------------------------


@preset
def forward_grad() -> Recipe:
    """Forward gradient (Baydin et al. 2022; the ZO-Bench baseline): the exact directional
    derivative along q=4 Gaussian directions by forward-mode AD, one forward pass each, no
    stored activations. q=1 diverged at lr 1e-3 on the MLP; q=4 with lr 3e-4 worked on
    both MLP and CNN (docs/methods.md)."""
    return Recipe(
        name="forward_grad",
        estimator=Estimator(kind="forward_grad", queries=4, direction="gaussian"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="sgd", lr=3e-4),
        steps=200,
        batch_size=32,
        description="Forward gradient (JVP), 4 directions, SGD, all parameters",
    )


@preset
def fixed_point_zo() -> Recipe:
    """Stepping Forward on the Last Mile (Feng et al. 2024): QZO-FF on an integer model,
    16-bit weights and 8-bit activations (the paper's working point), sign-m-SPSA over
    m=4 directions, stochastically rounded integer update. Perturbations along a standard
    normal direction, as the authors' patent on the method states (US 2025/0384337 A1:
    "a random perturbation vector that follows standard, normal distribution"; the
    paper's method section was not readable to us), quantized to 8 bits (k/32, |k| <=
    127, our choice) and applied as round(eps_q k / 32) grid steps, eps_q = round(eps / s);
    eps 1e-3 is ours too. On mnist-to-digits (MLP, 300 steps, seed 0) the normal direction
    reached 86.3%, Rademacher 85.3%. The update is sign(l+ - l-) z averaged over the
    directions (``sign_rule="projected"``). Weight scales per output channel, a weight
    grid of twice the largest weight (one bit of headroom); both ours. Runs on chain
    models (MLP, CNN with BN folded), not the ViT."""
    return Recipe(
        name="fixed_point_zo",
        estimator=Estimator(kind="zo", eps=1e-3, queries=4, direction="gaussian"),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="sign", lr=3e-3, sign_rule="projected"),
        numerics=Numerics(
            kind="fixed_point",
            weight_bits=16,
            activation_bits=8,
            per_channel=True,
            weight_headroom=2.0,
            rounding="stochastic",
            sync_float=True,
        ),
        steps=1000,
        batch_size=64,
        description="Fixed-point ZO (16-bit weights, 8-bit activations), sign-m-SPSA",
    )


# --- partial backprop (issue 5) ---------------------------------------------------------


@preset
def bsr() -> Recipe:
    """Block Selective Reprogramming (Sarkar et al. 2024, arXiv:2405.10951): backprop into
    the last 3 of the ViT's 4 blocks and the head; the frozen block reorganizes its tokens
    as EViT does (edgetrain.backward.token_drop): between its attention and its MLP it
    keeps CLS and the ceil(0.75 N) patch tokens CLS attends to most and fuses the other
    12 into one token, so the trained blocks run on 39 tokens instead of 50. Tokens are
    dropped in training steps only (``drop_at_inference=False``): the fine-tuned model is
    evaluated on all tokens. Tuned on mnist-to-digits (ViT, 150 steps, seeds 0-2) before
    fusion and the attention/MLP split: last 3 blocks, keep 0.75, Adam lr 1e-3 reached
    95.0/94.9/95.4% test accuracy (full_bp 93.6/96.2/96.4%); keep 0.5 varied more over
    seeds (85.7-93.3%), the last 2 blocks at keep 0.75, lr 2e-3 reached 84-94%. With both
    (this preset), seeds 0/1 reached 95.1/96.1% (on another CPU: accuracy before 51.3%,
    not 49.1%), at 1.71x less peak memory (15.60 vs 26.62 MiB) and 1.56x fewer step FLOPs
    than full_bp at batch 32."""
    return Recipe(
        name="bsr",
        estimator=Estimator(kind="backprop"),
        scope=Scope(kind="last_blocks", k=3, include_head=True),
        backward=Backward(kind="token_drop", keep_ratio=0.75, fuse_dropped=True),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=150,
        batch_size=32,
        description="BSR: backprop into the last 3 blocks, frozen blocks keep 75% of tokens",
    )


@preset
def sparse_update() -> Recipe:
    """Sparse update (Lin et al. 2022, "On-Device Training Under 256KB Memory"): the last
    two blocks train their biases and norms fully and a quarter of the *input* channels of
    each weight, those whose weights have the largest L2 norm, as tiny-training's
    ``magnitude+`` (edgetrain.backward.sparse_update: only those columns get a weight
    gradient, and only those input columns are saved), plus the head; SGD without
    momentum, as the reference's runs (``sgd_scale_nomom``). ``plan_sparse_update(model,
    batch, budget)`` chooses blocks and ratio for a memory budget instead; per-block ratios
    (``Scope.channel_ratios``) and a deeper bias update (``Scope.bias_k``) are scope
    fields. Tuned on mnist-to-digits (ViT, 150 steps, seed 0): SGD lr 0.05 / 0.15 / 0.3
    reached 91.9 / 93.4 / 92.0% (the first input channels instead of the largest, lr
    0.15: 91.8%)."""
    return Recipe(
        name="sparse_update",
        estimator=Estimator(kind="backprop"),
        scope=Scope(
            kind="channels",
            blocks=(-2, -1),
            channel_ratio=0.25,
            channel_select="magnitude",
            include_head=True,
        ),
        optimizer=Optimizer(kind="sgd", lr=0.15),
        steps=150,
        batch_size=32,
        description="Sparse update: last 2 blocks at 1/4 of input channels (largest) + "
        "biases + head, SGD",
    )


# --- hybrids (issue 5) ---


@preset
def elastic_zo() -> Recipe:
    """ElasticZO (Sugiura & Matsutani 2025, arXiv:2501.04287): the ViT's first 3 blocks
    (and its patch embedding) train by MeZO-style SPSA (ZO-SGD, lr 1e-4), the last block,
    final norm and head by backprop with Adam (lr 1e-3); only the tail's activations are
    stored. Tuned on mnist-to-digits (ViT, 1000 steps, batch 32, from 49.1%): 96.2/96.4%
    test accuracy at seeds 0/1 (mezo: 46.8/68.2%; the same tail by backprop with the
    front frozen: 95.8%); zo_lr 3e-5 gave 96.3%, 3e-4 diverged to 57.4%; cut 4 (only
    norm + head by backprop) 84.1%. Measured peak at batch 32: 8.3 MB vs mezo's 5.3 MB
    (cut 3, +57%: the last block's activations); cut 4 costs +0.06%."""
    return Recipe(
        name="elastic_zo",
        estimator=Estimator(kind="hybrid", cut=3, eps=1e-3, zo_lr=1e-4),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="adam", lr=1e-3),
        steps=1000,
        batch_size=32,
        description="ElasticZO: SPSA front (blocks 0-2), backprop tail (last block + head)",
    )


@preset
def elastic_zo_int8() -> Recipe:
    """ElasticZO-INT8 (Sugiura & Matsutani 2025, arXiv:2501.04287): an integer model with
    8-bit weights (one scale per tensor) and 8-bit activations; the first block trains by
    integer ZO (Rademacher perturbations, stochastically rounded integer ZO-SGD update),
    the rest and the head by an 8-bit integer backward with integer SGD. Runs on chain
    models (MLP, CNN with BN folded), not the ViT. Tuned on mnist-to-digits (MLP, 1000
    steps, batch 32, from 65.7%): 95.9% test accuracy (float elastic_zo with the same cut:
    96.7%, mezo: 84.1%); zo_lr 1e-4 (SGD) or sign at 1e-3 also trained; zo_lr above
    ~1e-4 saturates the 8-bit front weights. Its integer footprint
    (``ElasticZOInt8.footprint``) is 2.6x smaller than the same step in float32. One
    weight scale per tensor (the integer backward needs it), weight and error grids of
    twice the largest value seen at calibration (ours)."""
    return Recipe(
        name="elastic_zo_int8",
        estimator=Estimator(kind="hybrid", cut=1, eps=1e-3, direction="rademacher", zo_lr=1e-5),
        scope=Scope(kind="all"),
        optimizer=Optimizer(kind="sgd", lr=3e-2),
        numerics=Numerics(
            kind="fixed_point",
            weight_bits=8,
            activation_bits=8,
            per_channel=False,
            weight_headroom=2.0,
            rounding="stochastic",
            error_headroom=2.0,
            sync_float=True,
        ),
        steps=1000,
        batch_size=32,
        description="ElasticZO-INT8: integer ZO front (block 0), 8-bit backprop tail",
    )

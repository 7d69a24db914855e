"""The named recipes of the papers.

Each preset is a function returning a :class:`~edgetrain.recipe.Recipe`, registered with
``@preset`` (``edgetrain._registry``) in the module of the method it is about, next to
its implementation: ``mezo`` in ``edgetrain.estimators.zo``, ``lbp_wht`` in
``edgetrain.backward.wht``, ``galore`` in ``edgetrain.optim.galore``, the backprop
baselines in ``edgetrain.estimators.backprop``. Its docstring cites the paper and says
where its defaults come from (tuned on the built-in ``mnist-to-digits`` task; see
docs/methods.md). ``get(name, **overrides)`` returns the recipe with fields replaced
(``"axis.field"`` keys reach into an axis); ``names()`` lists them; ``GROUPS`` names sets of
them (``core``: one or two presets of every family, the newcomer's comparison) and
``select`` expands group names in a list of presets. ``get`` and ``names`` first import
every method module of the three axes (``load_all()``), so a method registered in an
axis's ``_MODULES`` table has its presets here with no other change.
"""

from __future__ import annotations

from typing import Any

from edgetrain import backward, estimators, optim
from edgetrain._registry import PRESETS, preset
from edgetrain.recipe import Recipe

__all__ = ["GROUPS", "names", "get", "select", "preset"]

_ORDER = (
    # backprop baselines (foundation)
    "full_bp",
    "last_layers",
    "bias_only",
    # zeroth-order: MeZO and its family (issue 3)
    "mezo",
    "sparse_mezo",
    "zo_sign",
    "zo_momentum",
    "zo_adam",
    "zo_cons",
    # cheaper backprop (issue 6)
    "lbp_wht",
    "mesa",
    "galore",
    "lowrank_grad",
    "checkpointed",
    # forward gradients (issue 4)
    "forward_grad",
    "fixed_point_zo",
    # partial backprop (issue 5)
    "bsr",
    "sparse_update",
    # hybrids (issue 5)
    "elastic_zo",
    "elastic_zo_int8",
    # fine-tuning schemes: adapters through peft (issue 15)
    "lora",
    "mezo_lora",
    "zo_adam_lora",
    "forward_grad_lora",
    "mezo_prefix",
    "mezo_prompt",
    # local learning without end-to-end backprop (issue 17)
    "mono_forward",
    "cascaded_forward",
    "forward_forward",
    "noprop",
    # training-engine savings (issue 18)
    "green_trainer",
    "streambp",
)
"""The order of ``names()`` (and so of ``compare``'s table): the built-in presets by
family, as they were listed before they moved next to their methods (module load order
would interleave the axes). Presets not listed follow in registration order."""


GROUPS: dict[str, tuple[str, ...]] = {
    "core": (
        "full_bp",
        "last_layers",
        "bias_only",
        "mezo",
        "zo_adam",
        "lbp_wht",
        "mesa",
        "galore",
        "lowrank_grad",
        "checkpointed",
        "bsr",
        "sparse_update",
        "elastic_zo",
        "lora",
        "mezo_lora",
        "mono_forward",
    ),
    "zo": (
        "full_bp",
        "mezo",
        "sparse_mezo",
        "zo_sign",
        "zo_momentum",
        "zo_adam",
        "zo_cons",
        "mezo_lora",
        "zo_adam_lora",
        "mezo_prefix",
        "mezo_prompt",
    ),
    "local": ("full_bp", "mono_forward", "cascaded_forward", "forward_forward", "noprop"),
    "long_sequence": ("full_bp", "checkpointed", "streambp"),
}
"""Named sets of presets, usable wherever a list of presets is (``select``; ``edgetrain
compare --presets core``). ``core``: the baseline and one or two presets of every family
(partial, zeroth-order, cheaper and hybrid backprop, adapters, local learning), the ones
a newcomer's single-seed comparison runs in about ten minutes on two cores; it leaves out
the slowest variants of a family (``sparse_mezo``, ``zo_cons``, ``forward_grad``: 1.5 to 2.4
times mezo's step) and what the built-in ViT skips. ``zo``: MeZO's family beside full_bp.
``local``: the local-learning methods beside full_bp (for ``--task mnist-scratch``).
``long_sequence``: StreamBP beside plain backprop and checkpointing, for a causal LM
(``--task polarity_lm``)."""


def select(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` with every group name (``GROUPS``) replaced by its presets, each preset
    once, in the order given. Other names pass through unchecked (``get`` refuses an
    unknown one)."""
    out: list[str] = []
    for name in names:
        for member in GROUPS.get(name, (name,)):
            if member not in out:
                out.append(member)
    return out


def _load() -> None:
    estimators.load_all()
    backward.load_all()
    optim.load_all()


def names() -> list[str]:
    """Every registered preset name: the built-in ones in ``_ORDER``, then the others in
    registration order."""
    _load()
    registered = PRESETS.names()
    return [n for n in _ORDER if n in PRESETS] + [n for n in registered if n not in _ORDER]


def get(name: str, **overrides: Any) -> Recipe:
    """The preset ``name`` with ``overrides`` applied (see ``Recipe.replace``)."""
    _load()
    recipe = PRESETS.get(name)()
    return recipe.replace(**overrides) if overrides else recipe

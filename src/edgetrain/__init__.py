"""edgetrain: fine-tune PyTorch models under a memory budget.

The entry points, loaded on first use (``import edgetrain`` stays light)::

    edgetrain.finetune(model, train_data, recipe)     # edgetrain.train.finetune
    edgetrain.measure(model, recipe, batch)           # edgetrain.memory.measure (a dry run)
    edgetrain.plan.plan_model(model, data, budget)    # the budget planner (a module)
    edgetrain.presets.get("mezo")                     # the named recipes
    edgetrain.optim.ZOSGD                             # the optimizers
"""

import importlib

from edgetrain import structure as _structure
from edgetrain.recipe import Backward, Estimator, Numerics, Optimizer, Recipe, Scope

# Model families whose structure rules the core reads (edgetrain.structure): imported on
# the first lookup, so a HuggingFace model built with transformers alone is understood.
_structure.add_provider("edgetrain.integrations.hf")

__version__ = "0.1.0"

__all__ = [
    "Recipe",
    "Estimator",
    "Scope",
    "Backward",
    "Optimizer",
    "Numerics",
    "finetune",
    "measure",
    "plan",
    "presets",
    "optim",
    "ConfigError",
    "__version__",
]

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "finetune": ("edgetrain.train", "finetune"),
    "measure": ("edgetrain.memory.measure", "measure"),
    "ConfigError": ("edgetrain.errors", "ConfigError"),
    "plan": ("edgetrain.plan", None),
    "presets": ("edgetrain.presets", None),
    "optim": ("edgetrain.optim", None),
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""edgetrain: fine-tune PyTorch models under a memory budget."""

from edgetrain.recipe import Backward, Estimator, Numerics, Optimizer, Recipe, Scope

__version__ = "0.1.0"

__all__ = ["Recipe", "Estimator", "Scope", "Backward", "Optimizer", "Numerics", "__version__"]

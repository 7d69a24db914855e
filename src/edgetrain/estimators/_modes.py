"""Re-export: the evaluation-mode and forked-RNG context managers live in
``edgetrain.optim.modes`` (the zeroth-order optimizer's closures use them too); the
estimators' imports of this module keep working."""

from __future__ import annotations

from edgetrain.optim.modes import evaluation_mode, forked_rng

__all__ = ["evaluation_mode", "forked_rng"]

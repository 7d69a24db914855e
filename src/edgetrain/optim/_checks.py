"""Constructor argument checks shared by the low-rank Adam optimizers (GaLore, low-rank
gradients): each error names the bad value, as torch.optim's do."""

from __future__ import annotations

__all__ = ["check_lowrank_adam_args"]


def check_lowrank_adam_args(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    rank: int,
    update_gap: int,
) -> None:
    if not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"Invalid betas: {betas} (two values in [0, 1))")
    if not eps > 0:
        raise ValueError(f"Invalid eps: {eps}")
    if weight_decay < 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank: {rank} (an integer >= 1)")
    if not isinstance(update_gap, int) or update_gap < 1:
        raise ValueError(f"Invalid update_gap: {update_gap} (an integer >= 1)")

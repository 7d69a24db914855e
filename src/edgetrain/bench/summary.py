"""Seeds into figures: each preset's runs of a comparison as a mean, a spread, and whether
its difference from the baseline exceeds that spread.

``compare(seeds=N)`` keeps one row per (preset, seed); :func:`summarize` groups them. The
accuracy after fine-tuning is reported as mean +- sample standard deviation over the
seeds (``statistics.stdev``, n - 1 in the denominator), with the lowest and highest seed;
memory, steps, passes and FLOPs are the median run's (memory depends on the seed only
through what the seed draws: a text batch's padded length, a random selection); time per
step is the median of the seeds' medians, wall time the mean.

Which differences exceed the seed spread (:func:`beyond_spread`): a preset's mean differs
from the baseline's (``full_bp`` when it ran, else the first preset) by more than the sum
of their standard deviations, i.e. the mean +- sd intervals do not overlap. With three
seeds each and equal spreads that is a two-sided Welch t-test at p < 0.07 (t > 2.45 on 4
degrees of freedom); it is a reading aid, not a significance claim. With one seed no
difference is marked: one seed cannot tell a gap from noise.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from edgetrain.bench.compare import CompareResult, Row

__all__ = ["PresetSummary", "summarize", "baseline_of", "beyond_spread", "BASELINE"]

BASELINE = "full_bp"
"""The preset every other is compared with when it ran (the mission's baseline)."""


@dataclass
class PresetSummary:
    preset: str
    status: str  # ok (at least one seed finished) | skipped | failed
    reason: str = ""
    seeds: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    """Accuracy after fine-tuning of each finished seed, in the order of ``seeds``."""
    befores: list[float] = field(default_factory=list)
    """Accuracy before fine-tuning of each finished seed (one figure for a pretrained
    model; a from-scratch task starts every seed from its own init)."""
    failed_seeds: list[int] = field(default_factory=list)
    row: Row | None = None
    """The median run (by accuracy): its memory, steps, passes and FLOPs stand for all."""
    median_step_seconds: float | None = None
    mean_wall_seconds: float | None = None

    @property
    def n(self) -> int:
        return len(self.accuracies)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.accuracies) if self.accuracies else None

    @property
    def sd(self) -> float | None:
        """Sample standard deviation over the seeds; None with fewer than two."""
        return statistics.stdev(self.accuracies) if self.n >= 2 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "status": self.status,
            "reason": self.reason,
            "seeds": self.seeds,
            "accuracies": self.accuracies,
            "befores": self.befores,
            "failed_seeds": self.failed_seeds,
            "mean": self.mean,
            "sd": self.sd,
            "median_step_seconds": self.median_step_seconds,
            "mean_wall_seconds": self.mean_wall_seconds,
            "peak": self.row.memory["peak"] if self.row and self.row.memory else None,
        }


def summarize(result: CompareResult) -> list[PresetSummary]:
    """One :class:`PresetSummary` per preset, in the order the presets first appear."""
    by_preset: dict[str, list[Row]] = {}
    for row in result.rows:
        by_preset.setdefault(row.preset, []).append(row)
    out = []
    for name, rows in by_preset.items():
        ok = sorted(
            (r for r in rows if r.status == "ok" and r.accuracy_after is not None),
            key=lambda r: r.seed,
        )
        failed = [r for r in rows if r.status == "failed"]
        if not ok:
            first = failed[0] if failed else rows[0]
            out.append(
                PresetSummary(
                    name,
                    first.status,
                    first.reason,
                    failed_seeds=[r.seed for r in failed],
                    row=first,
                )
            )
            continue
        by_acc = sorted(ok, key=lambda r: (r.accuracy_after, r.seed))
        steps = [r.median_step_seconds for r in ok if r.median_step_seconds is not None]
        walls = [r.wall_seconds for r in ok if r.wall_seconds is not None]
        out.append(
            PresetSummary(
                name,
                "ok",
                "; ".join(f"seed {r.seed} {r.reason}" for r in failed),
                seeds=[r.seed for r in ok],
                accuracies=[r.accuracy_after for r in ok],
                befores=[r.accuracy_before for r in ok if r.accuracy_before is not None],
                failed_seeds=[r.seed for r in failed],
                row=by_acc[(len(by_acc) - 1) // 2],
                median_step_seconds=statistics.median(steps) if steps else None,
                mean_wall_seconds=statistics.fmean(walls) if walls else None,
            )
        )
    return out


def baseline_of(summaries: list[PresetSummary]) -> PresetSummary | None:
    """``full_bp``'s summary when it ran, else the first preset that did."""
    ok = [s for s in summaries if s.status == "ok"]
    return next((s for s in ok if s.preset == BASELINE), ok[0] if ok else None)


def beyond_spread(a: PresetSummary, b: PresetSummary) -> bool | None:
    """Whether the mean accuracies of ``a`` and ``b`` differ by more than the sum of their
    standard deviations; None when either has fewer than two seeds."""
    if a.sd is None or b.sd is None:
        return None
    return abs(a.mean - b.mean) > a.sd + b.sd

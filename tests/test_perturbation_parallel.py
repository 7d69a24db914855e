"""Perturbation parallelism (DistZO2, edgetrain.distributed): the two perturbed
evaluations of an SPSA step on two ranks, bit-identical to one process.

Two levels. Without processes, ``ZOSGD.estimate(evaluates=...)`` is run once per side of
the pair over a table of optimizer settings, the values of the points the side does not
evaluate filled in from a reference run (one process, every point): the points a side
evaluates must give the reference's losses bit for bit (so its weights at that point are
the reference's), and its weights after every step must be the reference's. Then forked
gloo ranks run ``finetune(perturbation_parallel=True)``: 2 ranks against one process,
4 ranks (2 data groups of 2) against 2 plain data-parallel ranks, and a run stopped and
resumed (on the pair, then in one process) against one that never stopped.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

from edgetrain import distributed as D
from edgetrain import presets
from edgetrain.errors import ConfigError
from edgetrain.journal import read_journal, replay
from edgetrain.optim.zo import ZOSGD
from edgetrain.train import finetune
from tests.test_distributed import QUICK, _run_ranks
from tests.test_distributed import pytestmark as _needs_gloo

STEPS = 6

# -- the optimizer alone, both sides simulated ------------------------------------------

CASES = {
    "sgd": {},
    "sgd_decay": dict(weight_decay=0.1),
    "queries_3": dict(queries=3),
    "rademacher": dict(direction="rademacher"),
    "one_sided": dict(difference="one_sided"),
    "one_sided_q2": dict(difference="one_sided", queries=2),
    "adam": dict(rule="adam"),
    "adamw_q2": dict(rule="adamw", queries=2, weight_decay=0.05),
    "momentum": dict(rule="momentum"),
    "sign_projected": dict(rule="sign", sign_rule="projected"),
    "sparse_mezo": dict(sparsity=0.5),
    "grad_sparsity": dict(grad_sparsity=0.5),
    "cons": dict(cons=True),
    "every_block": dict(block_zo="every_block", queries=2),
    "round_robin": dict(block_zo="round_robin"),
    "small_chunks": dict(chunk_elements=100),
}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))


def _groups(net: nn.Module, blocks: bool) -> list[dict[str, Any]]:
    return [
        {"params": list(m.parameters()), **({"block": i} if blocks else {})}
        for i, m in enumerate(m for m in net if isinstance(m, nn.Linear))
    ]


def _opt(net: nn.Module, settings: dict[str, Any]) -> ZOSGD:
    blocks = settings.get("block_zo", "none") != "none"
    return ZOSGD(_groups(net, blocks), lr=0.05, eps=1e-2, seed=7, **settings)


X, Y = torch.randn(24, 12, generator=torch.Generator().manual_seed(1)), torch.arange(24) % 3


def _loss(net: nn.Module) -> torch.Tensor:
    return nn.functional.cross_entropy(net(X), Y)


@pytest.mark.parametrize("name", list(CASES))
def test_each_side_reaches_the_single_process_weights_bit_for_bit(name):
    settings = CASES[name]
    reference = _net()
    base = copy.deepcopy(reference)
    opt = _opt(reference, settings)
    logs: list[list[float]] = []  # every loss value of each step, in evaluation order
    records = []
    for _ in range(STEPS):
        log: list[float] = []
        logs.append(log)

        def closure(net=reference, log=log) -> torch.Tensor:
            value = _loss(net)
            log.append(float(value))
            return value

        opt.step(closure)
        records.append(opt.last_record)
    pairs = zip(reference.parameters(), base.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)

    for side in (0, 1):
        net = copy.deepcopy(base)
        opt = _opt(net, settings)
        local = 0
        for step in range(STEPS):
            offset = 0

            def reduce(values, evaluated, step=step):
                nonlocal offset
                expected = logs[step][offset : offset + len(values)]
                for value, here, want in zip(values, evaluated, expected, strict=True):
                    assert not here or value == want  # same weights at that point: same loss
                offset += len(values)
                return expected

            def closure(net=net) -> torch.Tensor:
                return _loss(net)

            record = opt.estimate(
                closure, reduce_scalars=reduce, evaluates=lambda i, s=side: i % 2 == s
            )
            local += opt.local_evaluations
            opt.apply_record(record)
            assert record.to_dict() == records[step].to_dict()
            assert offset == len(logs[step])
        for a, b in zip(net.parameters(), reference.parameters(), strict=True):
            assert torch.equal(a, b), name
        # Per step, the points of index i with i % 2 == side ran here, the others not.
        assert local == sum(len(range(side, len(log), 2)) for log in logs)

    # Replay (all moves deferred up to the update) reproduces the weights too.
    replayed = copy.deepcopy(base)
    opt = _opt(replayed, settings)
    for record in records:
        opt.apply_record(record)
    for a, b in zip(replayed.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_evaluates_needs_the_shared_hook_and_a_nonfinite_value_undoes_the_deferred_moves():
    net = _net()
    base = copy.deepcopy(net)
    opt = _opt(net, {})
    with pytest.raises(ValueError, match="needs reduce_scalars"):
        opt.estimate(lambda: _loss(net), evaluates=lambda i: True)
    from edgetrain.optim.zo import NonFiniteLoss

    # Side 0 evaluates l+ only; the other side's l- comes back NaN: side 0 stands at
    # theta + eps z with -2 eps z still deferred, and must come back to theta.
    with pytest.raises(NonFiniteLoss):
        opt.estimate(
            lambda: _loss(net),
            reduce_scalars=lambda v, e: [x if h else math.nan for x, h in zip(v, e, strict=True)],
            evaluates=lambda i: i % 2 == 0,
        )
    for a, b in zip(net.parameters(), base.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_shared_scalars_without_a_group_and_the_refusals(task):
    from edgetrain import estimators

    model = task.pretrained("mlp")
    with pytest.raises(ValueError, match="even number of ranks; got 3"):
        D.check_perturbation_parallel(object(), 3)
    for recipe in (
        presets.get("fixed_point_zo"),
        presets.get("elastic_zo", **{"estimator.cut": 1}),
        presets.get("full_bp"),
    ):
        est = estimators.build(copy.deepcopy(model), recipe)
        with pytest.raises(NotImplementedError, match=repr(recipe.estimator.kind)):
            D.check_perturbation_parallel(est, 4)
    D.check_perturbation_parallel(estimators.build(copy.deepcopy(model), presets.get("mezo")), 2)
    est = estimators.build(copy.deepcopy(model), presets.get("forward_grad"))
    with pytest.raises(NotImplementedError, match="'forward_grad' with numerics 'float32'"):
        D.check_perturbation_parallel(est, 2)
    with pytest.raises(ConfigError, match="perturbation_parallel=True needs"):
        finetune(model, task.train, presets.get("mezo"), perturbation_parallel=True, **QUICK)


# -- gloo ranks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(task) -> nn.Module:
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # import torch._dynamo pre-fork
    return task.pretrained("mlp")


def _mezo(**overrides: Any):
    return presets.get("mezo", **overrides)


def _single(task, base_model, recipe, steps, ckpt=None) -> nn.Module:
    net = copy.deepcopy(base_model)
    finetune(net, task.train, recipe, steps=steps, batch_size=32, checkpoint_dir=ckpt, **QUICK)
    return net


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@_needs_gloo
def test_two_ranks_equal_one_process_bit_for_bit_and_resume(task, base_model, tmp_path):
    """MeZO (Gaussian z) and ZO-Adam (q = 2) on a pair; a pair stopped at step 3 and
    resumed to STEPS; a pair stopped at 3 and finished in one process."""
    recipes = {"mezo": _mezo(), "zo_adam": presets.get("zo_adam", **{"estimator.queries": 2})}

    def body(rank: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, recipe in recipes.items():
            net = copy.deepcopy(base_model)
            fit = finetune(
                net,
                task.train,
                recipe,
                steps=STEPS,
                batch_size=32,
                perturbation_parallel=True,
                checkpoint_dir=tmp_path / f"{name}_full",
                **QUICK,
            )
            out[name] = {
                "state": net.state_dict(),
                "comm": fit.comm_bytes_by_kind,
                "forwards": fit.forward_passes,
                "losses": [h["loss"] for h in fit.history],
            }
        for stop in ("pair", "alone"):
            ckpt = tmp_path / f"resume_{stop}"
            finetune(
                copy.deepcopy(base_model),
                task.train,
                _mezo(),
                steps=3,
                batch_size=32,
                perturbation_parallel=True,
                checkpoint_dir=ckpt,
                checkpoint_every=2,
                **QUICK,
            )
            if stop == "pair":
                net = copy.deepcopy(base_model)
                fit = finetune(
                    net,
                    task.train,
                    _mezo(),
                    steps=STEPS,
                    batch_size=32,
                    perturbation_parallel=True,
                    checkpoint_dir=ckpt,
                    **QUICK,
                )
                out["resumed"] = {"state": net.state_dict(), "from": fit.resumed_from}
        return out

    codes, _ = _run_ranks(2, body, tmp_path / "ranks")
    assert codes == [0, 0], [p.read_text() for p in (tmp_path / "ranks").glob("error*")]
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt") for r in range(2)]
    for name, recipe in recipes.items():
        single = _single(task, base_model, recipe, STEPS, tmp_path / f"{name}_single")
        a, b = ranks[0][name], ranks[1][name]
        assert _state_equal(a["state"], single.state_dict()), name
        assert _state_equal(b["state"], single.state_dict()), name
        assert a["losses"] == b["losses"]
        # The journals are the single process's, record for record.
        one = read_journal(tmp_path / f"{name}_single" / "zo_journal.jsonl").records
        two = read_journal(tmp_path / f"{name}_full" / "zo_journal.jsonl").records
        assert [r.to_dict() for r in one] == [r.to_dict() for r in two]
        q = recipe.estimator.queries
        # Each rank sends the q values it evaluated: 8 q bytes, and runs q forwards.
        assert a["comm"] == b["comm"] == {"scalars": 8 * q}
        assert a["forwards"] == b["forwards"] == q * STEPS
    assert not _state_equal(single.state_dict(), base_model.state_dict())
    # Stopped at 3 (checkpoint at 2, journal to 3) and resumed on the pair.
    mezo_single = _single(task, base_model, _mezo(), STEPS)
    assert ranks[0]["resumed"]["from"] == 3
    assert _state_equal(ranks[0]["resumed"]["state"], mezo_single.state_dict())
    assert _state_equal(ranks[1]["resumed"]["state"], mezo_single.state_dict())
    # ... or finished in one process, from the pair's checkpoint and journal.
    alone = copy.deepcopy(base_model)
    fit = finetune(
        alone,
        task.train,
        _mezo(),
        steps=STEPS,
        batch_size=32,
        checkpoint_dir=tmp_path / "resume_alone",
        **QUICK,
    )
    assert fit.resumed_from == 3
    assert _state_equal(alone.state_dict(), mezo_single.state_dict())
    replayed = copy.deepcopy(base_model)
    replay(replayed, tmp_path / "resume_alone" / "zo_journal.jsonl")
    assert _state_equal(replayed.state_dict(), mezo_single.state_dict())


@_needs_gloo
def test_four_ranks_equal_two_data_parallel_ranks_bit_for_bit(task, base_model, tmp_path):
    """W = 4: data groups {0, 1} and {2, 3}, each pair splitting +-eps on its half of the
    batch (31 examples: uneven halves 15 and 16, weighted 15/31 and 16/31), against 2
    plain data-parallel ranks on the same halves."""

    def body(rank: int) -> dict[str, Any]:
        net = copy.deepcopy(base_model)
        split = D.get_world_size() == 4
        fit = finetune(
            net,
            task.train,
            _mezo(),
            steps=STEPS,
            batch_size=31,
            perturbation_parallel=split,
            **QUICK,
        )
        return {"state": net.state_dict(), "losses": [h["loss"] for h in fit.history]}

    codes, _ = _run_ranks(4, body, tmp_path / "four")
    assert codes == [0] * 4, [p.read_text() for p in (tmp_path / "four").glob("error*")]
    codes, _ = _run_ranks(2, body, tmp_path / "two")
    assert codes == [0] * 2, [p.read_text() for p in (tmp_path / "two").glob("error*")]
    four = [torch.load(tmp_path / "four" / f"rank{r}.pt") for r in range(4)]
    two = torch.load(tmp_path / "two" / "rank0.pt")
    for run in four:
        assert _state_equal(run["state"], two["state"])
        assert run["losses"] == two["losses"]
    assert not _state_equal(two["state"], base_model.state_dict())


@_needs_gloo
def test_the_cli_flag_under_torchrun_trains_the_single_process_weights(task, base_model, tmp_path):
    weights = tmp_path / "final.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env["EDGETRAIN_DIST_TIMEOUT"] = "60"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "edgetrain",
            "finetune",
            "--model=mlp",
            "--recipe=mezo",
            "--steps=4",
            "--perturbation-parallel",
            f"--output={weights}",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "comm        8 bytes/step per rank (2 ranks, perturbation-parallel; scalars 8)" in (
        proc.stdout
    )
    single = copy.deepcopy(base_model)
    finetune(single, task.train, presets.get("mezo"), steps=4, **QUICK)
    assert _state_equal(torch.load(weights, weights_only=True), single.state_dict())

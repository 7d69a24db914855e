"""Data-parallel training (edgetrain.distributed) on local gloo process groups.

Ranks are forked from the test process, so they share the already-loaded task and
pretrained model instead of importing torch again; loopback only: a TCPStore on
127.0.0.1 on a port the OS picks (no race for a "free" port), gloo on ``lo``. One test
launches the real CLI under ``torchrun --standalone``. Every wait is bounded.

Tolerance of "2 ranks on equal shards == 1 process on the union batch" (ZO, MeZO with
Rademacher z so |z_i| = 1 exactly, SGD, no weight decay). Both runs use the same seeds,
so the same z at every step; they differ only by float rounding (u = 2^-24):

* the loss. One process: the float32 mean of 32 per-example losses; two ranks: two
  float32 means of 16, averaged in float64. A float32 sum of n positive terms is within
  (n - 1) u of its exact value relatively, so the two differ by at most about
  (31 + 15) u |l|, plus a few u where a matmul over 16 rows rounds differently from one
  over 32. We allow |dl| <= 64 u (|l| + 1) per evaluation at equal weights (step 0),
  hence |dg| <= 64 u (|l+| + |l-| + 2) / (2 eps) for g = (l+ - l-) / (2 eps).
* the weights. theta_T = theta_0 + sum_t (eps - 2 eps + eps - lr g_t) z_t, three in-place
  adds per step. With |z| = 1 the runs differ by lr sum_t |dg_t| from the projected
  gradients, plus each add's rounding, at most u (max|theta| + eps) per add: 3 T such
  roundings per run, two runs. The dg_t are read from the two journals (after step 0 the
  weights already differ by rounding, so dg_t is measured, not bounded a priori).
  Uneven shards (31 = 15 + 16, weighted 15/31 and 16/31) obey the same bound.
"""

from __future__ import annotations

import copy
import datetime
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from edgetrain import distributed as D
from edgetrain import presets
from edgetrain.estimators.base import default_loss
from edgetrain.journal import read_journal, replay
from edgetrain.train import finetune

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "fork") and dist.is_available() and dist.is_gloo_available()),
    reason="needs fork and torch.distributed with gloo",
)

QUICK = dict(progress=False, measure=False, evaluate=False)
TIMEOUT_S = 15.0  # process-group timeout in the ranks
U = 2.0**-24  # float32 unit roundoff
STEPS = 8


def _rank_main(rank: int, world: int, port: int, body, out: Path) -> None:
    """A forked rank: join the group, run ``body(rank)``, save what it returns."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        result = body(rank)
    except Exception as err:  # noqa: BLE001 - reported to the test through the file
        (out / f"error{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        os._exit(1)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _run_ranks(world: int, body, out: Path, wait_s: float = 120.0) -> tuple[list, float]:
    """Fork ``world`` ranks running ``body``; return their exit codes and the seconds
    until the first one exited non-zero (or all exited)."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    # The rendezvous store listens in this process on a port the OS picks (no race for
    # a "free" port); the ranks connect to it over loopback.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    port = store.port
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, body, out)) for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    deadline = start + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - start
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    del store
    return [p.exitcode for p in procs], elapsed


@pytest.fixture(scope="module")
def base_model(task) -> nn.Module:
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # import torch._dynamo pre-fork
    return task.pretrained("mlp")


def _mezo(**overrides: Any):
    return presets.get("mezo", **{"estimator.direction": "rademacher", **overrides})


# -- pieces --------------------------------------------------------------------------------


def test_shards_cover_the_batch_and_differ_by_at_most_one():
    for n in (7, 31, 32):
        for world in (1, 2, 3, 4):
            bounds = [D.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1
    x, y = torch.arange(10).reshape(5, 2), torch.arange(5)
    sx, sy = D.shard_batch((x, y), rank=1, world=2)
    assert torch.equal(sx, x[2:5]) and torch.equal(sy, y[2:5])
    assert torch.equal(D.shard_batch({"y": y}, rank=0, world=2)["y"], y[:2])
    D.check_shards(898, 32, 2)  # last batch: 898 mod 32 = 2 examples, one per rank
    with pytest.raises(ValueError, match="last batch of each epoch has 2"):
        D.check_shards(898, 32, 3)


def test_without_a_process_group_everything_is_one_rank(task, base_model):
    assert not D.is_initialized() and D.get_world_size() == 1 and D.is_main()
    counter = D.CommCounter()
    assert D.allreduce_mean_scalars([1.5, -2.0], counter=counter) == [1.5, -2.0]
    counter.end_step()
    assert counter.bytes_per_step == 16 and counter.mean_by_kind() == {"scalars": 16}
    with pytest.raises(ValueError, match="needs an initialised"):
        finetune(base_model, task.train, presets.get("mezo"), data_parallel=True, **QUICK)


# -- two ranks -----------------------------------------------------------------------------

JOBS = {
    "mezo": dict(recipe=lambda: _mezo(), batch_size=32, journal=True),
    "mezo_uneven": dict(recipe=lambda: _mezo(), batch_size=31, journal=True),
    "forward_grad": dict(recipe=lambda: presets.get("forward_grad"), batch_size=32),
    "full_bp": dict(recipe=lambda: presets.get("full_bp"), batch_size=32),
    "elastic_zo": dict(recipe=lambda: _elastic(), batch_size=32),
}


def _elastic(**overrides: Any):
    """ElasticZO on the MLP: block 0 by ZO (Rademacher z), block 1 and the head by
    plain SGD (no state, so 1 process and 2 ranks differ only by float rounding)."""
    return presets.get(
        "elastic_zo",
        **{
            "estimator.cut": 1,
            "estimator.direction": "rademacher",
            "optimizer.kind": "sgd",
            "optimizer.lr": 0.05,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def two_ranks(task, base_model, tmp_path_factory) -> dict[str, Any]:
    """Every job of JOBS trained for STEPS steps on 2 ranks (one process group)."""
    out = tmp_path_factory.mktemp("two_ranks")

    def body(rank: int) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name, job in JOBS.items():
            net = copy.deepcopy(base_model)
            ckpt = out / name if job.get("journal") else None
            fit = finetune(
                net,
                task.train,
                job["recipe"](),
                steps=STEPS,
                batch_size=job["batch_size"],
                checkpoint_dir=ckpt,
                **QUICK,
            )
            results[name] = {
                "state": net.state_dict(),
                "digest": D.weights_digest(net),
                "comm": fit.comm_bytes_per_step,
                "by_kind": fit.comm_bytes_by_kind,
                "world": fit.world_size,
                "losses": [h["loss"] for h in fit.history],
            }
        # A time budget stops every rank at the same step (one vote per step).
        fit = finetune(
            copy.deepcopy(base_model), task.train, _mezo(), steps=100, time_budget=1e-9, **QUICK
        )
        results["budget"] = (fit.steps, fit.stopped is not None, fit.comm_bytes_by_kind)
        try:  # an estimator without a scalar hook or DDP path refuses clearly
            finetune(
                copy.deepcopy(base_model),
                task.train,
                presets.get("fixed_point_zo"),
                steps=1,
                **QUICK,
            )
        except NotImplementedError as err:
            results["refused"] = str(err)
        return results

    codes, _ = _run_ranks(2, body, out)
    errors = [p.read_text() for p in out.glob("error*.txt")]
    assert codes == [0, 0], errors
    return {"out": out, "ranks": [torch.load(out / f"rank{r}.pt") for r in range(2)]}


@pytest.mark.parametrize("name", list(JOBS))
def test_weights_are_bit_identical_across_ranks(two_ranks, base_model, name):
    a, b = (two_ranks["ranks"][r][name] for r in range(2))
    assert a["world"] == b["world"] == 2
    assert a["digest"] == b["digest"]
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert a["losses"] == b["losses"]  # every rank saw the whole batch's loss
    moved = any(not torch.equal(a["state"][k], v) for k, v in base_model.state_dict().items())
    assert moved


def test_bytes_per_step_zo_a_few_scalars_backprop_the_trainable_parameters(two_ranks, base_model):
    ranks = two_ranks["ranks"]
    for rank in ranks:
        # MeZO, two-sided, q = 1: the loss pair, two float64 = 16 bytes per step.
        assert rank["mezo"]["comm"] == 16 and rank["mezo"]["by_kind"] == {"scalars": 16}
        # Forward gradient, q = 4: the loss and 4 JVPs, 5 float64.
        q = presets.get("forward_grad").estimator.queries
        assert rank["forward_grad"]["comm"] == 8 * (q + 1)
        # Backprop: every trainable parameter's float32 gradient, plus the loss value.
        trainable = sum(p.numel() * p.element_size() for p in base_model.parameters())
        assert rank["full_bp"]["by_kind"] == {"gradients": trainable, "scalars": 8}
        assert rank["full_bp"]["comm"] == trainable + 8
        # ElasticZO: the front's loss pair (16 bytes) and the tail's float32 gradients.
        net = copy.deepcopy(base_model)
        tail = [p for b in net.blocks[1:] for p in b.parameters()] + list(net.head.parameters())
        tail_bytes = sum(p.numel() * p.element_size() for p in tail)
        assert rank["elastic_zo"]["by_kind"] == {"scalars": 16, "gradients": tail_bytes}
    refused = ranks[0]["refused"]
    assert "not implemented" in refused and "fixed_point" in refused
    assert ranks[0]["budget"] == ranks[1]["budget"] == (1, True, {"control": 8, "scalars": 16})


@pytest.mark.parametrize("name", ["mezo", "mezo_uneven"])
def test_zo_two_ranks_equal_one_process_on_the_union_batch(
    two_ranks, task, base_model, tmp_path, name
):
    job = JOBS[name]
    recipe = job["recipe"]()
    single = copy.deepcopy(base_model)
    finetune(
        single,
        task.train,
        recipe,
        steps=STEPS,
        batch_size=job["batch_size"],
        checkpoint_dir=tmp_path,
        **QUICK,
    )
    two = read_journal(two_ranks["out"] / name / "zo_journal.jsonl").records
    one = read_journal(tmp_path / "zo_journal.jsonl").records
    assert len(two) == len(one) == STEPS
    assert [r.seed for r in two] == [r.seed for r in one]  # same directions
    eps, lr = recipe.estimator.eps, recipe.optimizer.lr
    # Step 0 starts from equal weights: only the loss rounding separates the runs.
    # record.loss is the mean of the pair, so |l+| + |l-| <= 2 |loss| + |l+ - l-|.
    first_pair = 2 * abs(one[0].loss) + 2 * eps * abs(one[0].grads[0])
    assert abs(two[0].grads[0] - one[0].grads[0]) <= 64 * U * (first_pair + 2) / (2 * eps)
    dg = [abs(a.grads[0] - b.grads[0]) for a, b in zip(two, one, strict=True)]
    state = two_ranks["ranks"][0][name]["state"]
    theta_max = max(float(p.abs().max()) for p in single.state_dict().values())
    bound = lr * sum(dg) + 2 * 3 * STEPS * U * (theta_max + eps)
    worst = max(float((state[k] - v).abs().max()) for k, v in single.state_dict().items())
    assert worst <= bound, (worst, bound, dg)
    assert math.isfinite(worst)


def test_elastic_zo_two_ranks_match_one_process_on_the_union_batch(two_ranks, task, base_model):
    """Same seeds, so the same z; the two runs differ by float rounding only: the loss
    pair (float32 means of 32 vs 2 x 16 examples) and the tail gradient (a sum over 32
    rows vs two sums of 16, halved and added). A wrong shard weight (a sum of the two
    ranks' gradients, say) doubles the tail step and fails by orders of magnitude."""
    single = copy.deepcopy(base_model)
    fit = finetune(single, task.train, _elastic(), steps=STEPS, batch_size=32, **QUICK)
    two = two_ranks["ranks"][0]["elastic_zo"]
    assert two["losses"] == pytest.approx([h["loss"] for h in fit.history], rel=1e-5)
    for key, value in single.state_dict().items():
        moved = float((value - base_model.state_dict()[key]).abs().max())
        diff = float((two["state"][key] - value).abs().max())
        assert diff <= 1e-5 * max(1.0, float(value.abs().max())), (key, diff, moved)
    assert any(
        not torch.equal(v, base_model.state_dict()[k]) for k, v in single.state_dict().items()
    )


# -- faults and resume ---------------------------------------------------------------------


def test_killed_rank_stops_the_other_and_the_run_resumes_on_2_then_1_then_2_ranks(
    task, base_model, tmp_path
):
    total, kill_at_call = 24, 20  # MeZO evaluates twice per step: killed in step 9
    recipe = _mezo(steps=total)
    ckpt = tmp_path / "run"

    def body(rank: int) -> None:
        calls = 0

        def loss(model: nn.Module, batch: Any) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if rank == 1 and calls == kill_at_call:
                os.kill(os.getpid(), signal.SIGKILL)
            return default_loss(model, batch)

        finetune(
            copy.deepcopy(base_model),
            task.train,
            recipe,
            checkpoint_dir=ckpt,
            checkpoint_every=5,
            loss_fn=loss,
            **QUICK,
        )

    codes, elapsed = _run_ranks(2, body, tmp_path / "ranks", wait_s=TIMEOUT_S + 30)
    assert codes == [1, -signal.SIGKILL]
    assert elapsed < TIMEOUT_S + 10  # stopped by the group, not by our join deadline
    error = (tmp_path / "ranks" / "error0.txt").read_text()
    assert error.startswith("DistributedError") and "at step 9" in error and "resume" in error
    # On disk: rank 0's checkpoint (step 5) and a journal of the 9 finished steps.
    assert torch.load(ckpt / "checkpoint.pt", weights_only=True)["step"] == 5
    assert len(read_journal(ckpt / "zo_journal.jsonl").records) == 9

    # Resume on 2 ranks (Python API) to step 14: the checkpoint is of step 5, so rank 0
    # replays journal records 5..8 while writing, rank 1 replays them read-only ...
    def resume(rank: int) -> dict[str, Any]:
        net = copy.deepcopy(base_model)
        fit = finetune(net, task.train, recipe, steps=14, checkpoint_dir=ckpt, **QUICK)
        return {"resumed": fit.resumed_from, "steps": fit.steps, "digest": D.weights_digest(net)}

    codes, _ = _run_ranks(2, resume, tmp_path / "resume")
    assert codes == [0, 0], [p.read_text() for p in (tmp_path / "resume").glob("error*")]
    runs = [torch.load(tmp_path / "resume" / f"rank{r}.pt") for r in range(2)]
    assert runs[0] == runs[1] and runs[0]["resumed"] == 9 and runs[0]["steps"] == 14
    # ... then in one process (no group) to step 19 ...
    net = copy.deepcopy(base_model)
    fit = finetune(net, task.train, recipe, steps=19, checkpoint_dir=ckpt, **QUICK)
    assert fit.resumed_from == 14 and fit.steps == 19 and fit.world_size == 1
    # ... then on 2 ranks through the CLI under torchrun, to the end.
    weights = tmp_path / "final.pt"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "EDGETRAIN_DIST_TIMEOUT": str(TIMEOUT_S),
        "GLOO_SOCKET_IFNAME": "lo",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # rendezvous on localhost, on a port the OS picks
            "--nproc-per-node=2",
            "-m",
            "edgetrain",
            "finetune",
            "--model=mlp",
            "--recipe=mezo",
            "--set=estimator.direction=rademacher",
            f"--steps={total}",
            f"--checkpoint-dir={ckpt}",
            f"--output={weights}",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("recipe      mezo") == 1  # only rank 0 prints
    assert "resumed     from step 19" in proc.stdout
    assert "comm        16 bytes/step per rank (2 ranks; scalars 16)" in proc.stdout
    records = read_journal(ckpt / "zo_journal.jsonl").records
    assert [r.step for r in records] == list(range(total))
    # The journal written by 2, 2, 1, then 2 ranks replays to the final weights exactly.
    replayed = copy.deepcopy(base_model)
    replay(replayed, ckpt / "zo_journal.jsonl")
    final = torch.load(weights, weights_only=True)
    assert all(torch.equal(final[k], v) for k, v in replayed.state_dict().items())

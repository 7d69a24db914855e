"""Drawing z on worker threads (``Perturber.prefetch``, ``ZOSGD(threads=...)``,
``recipe.Estimator.zo_threads``): the same z and the same trained weights bit for bit as
drawing on the calling thread, journals that replay across thread counts, every buffer
allocated where a thread-local memory meter sees it, and the caller's intra-op thread
count left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgetrain.errors import ConfigError
from edgetrain.estimators import build as build_estimator
from edgetrain.optim.perturb import Perturber
from edgetrain.optim.zo import ZOSGD
from edgetrain.recipe import Estimator, Optimizer, Recipe


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
@pytest.mark.parametrize("threads", [2, 3])
def test_prefetch_draws_each_chunk_as_direction_does(direction, threads):
    chunk = 4096
    sizes = [4096, 4096, 1000, 33, 4096, 7, 2048, 4096, 4096, 1]  # odd tails included
    jobs = [(12345 + j % 3, j // 2, j, n, torch.device("cpu")) for j, n in enumerate(sizes)]
    serial = Perturber(direction, chunk)
    expected = [serial.direction(*job).clone() for job in jobs]
    threaded = Perturber(direction, chunk)
    got = [z.clone() for z in threaded.prefetch(jobs, threads)]
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_prefetch_restores_the_intra_op_thread_count_even_when_abandoned():
    before = torch.get_num_threads()
    perturber = Perturber("gaussian", 1024)
    jobs = [(1, 0, j, 1024, torch.device("cpu")) for j in range(8)]
    it = perturber.prefetch(jobs, 2)
    next(it)
    it.close()  # the caller stops early (an exception in its loop)
    assert torch.get_num_threads() == before
    list(perturber.prefetch(jobs, 2))
    assert torch.get_num_threads() == before


def _model_params(seed: int = 0) -> list[dict]:
    """Two param groups (one decayed) over tensors larger and smaller than a chunk, so
    the plan has own-tensor chunks, a partial last chunk and a packed chunk."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(70, 50), (50,), (3000,), (13,), (40, 40)]
    params = [nn.Parameter(0.1 * torch.randn(s, generator=gen)) for s in shapes]
    return [
        {"params": [params[0], params[2], params[4]], "weight_decay": 1e-2},
        {"params": [params[1], params[3]], "weight_decay": 0.0},
    ]


def _loss(params: list[torch.Tensor]) -> torch.Tensor:
    return sum(((p - 0.05) ** 2).sum() * (k + 1) for k, p in enumerate(params))


CASES = {
    "mezo_gaussian": dict(),
    "mezo_rademacher": dict(direction="rademacher"),
    "one_sided": dict(difference="one_sided"),
    "q3_momentum": dict(queries=3, rule="momentum"),
    "adam": dict(rule="adam"),
    "cons": dict(cons=True, weight_decay=0.0),
    "sparse_mezo": dict(sparsity=0.5),  # masked passes stay on the calling thread
    "grad_sparsity": dict(grad_sparsity=0.3),
    "round_robin": dict(block_zo="round_robin"),
}


def _train(case: dict, threads: int, steps: int = 4):
    groups = _model_params()
    params = [p for g in groups for p in g["params"]]
    if case.get("weight_decay") == 0.0:
        for g in groups:
            g["weight_decay"] = 0.0
    kwargs = {k: v for k, v in case.items() if k != "weight_decay"}
    if case.get("block_zo") == "round_robin":
        groups[0]["block"], groups[1]["block"] = 0, 1
    opt = ZOSGD(groups, lr=1e-3, eps=1e-3, chunk_elements=1024, seed=7, threads=threads, **kwargs)
    records = []
    for _ in range(steps):
        opt.step(lambda: _loss(params))
        records.append(copy.deepcopy(opt.last_record))
    return [p.detach().clone() for p in params], records


@pytest.mark.parametrize("name", sorted(CASES))
def test_threaded_training_equals_single_threaded_bit_for_bit(name):
    serial, serial_records = _train(CASES[name], threads=1)
    threaded, threaded_records = _train(CASES[name], threads=2)
    assert [r.to_dict() for r in threaded_records] == [r.to_dict() for r in serial_records]
    for a, b in zip(threaded, serial, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["mezo_gaussian", "mezo_rademacher", "q3_momentum"])
@pytest.mark.parametrize("train_threads,replay_threads", [(2, 1), (1, 2)])
def test_records_replay_across_thread_counts(name, train_threads, replay_threads):
    """A journal of a run with one thread count replays with another (``threads`` is no
    part of ``config()``), bit for bit from the base weights."""
    trained, records = _train(CASES[name], threads=train_threads)
    groups = _model_params()
    params = [p for g in groups for p in g["params"]]
    replayer = ZOSGD(
        groups,
        lr=1e-3,
        eps=1e-3,
        chunk_elements=1024,
        seed=7,
        threads=replay_threads,
        **CASES[name],
    )
    assert "threads" not in replayer.config()
    for record in records:
        replayer.apply_record(record)
    for a, b in zip(params, trained, strict=True):
        assert torch.equal(a.detach(), b)


def test_state_dict_resume_with_another_thread_count_is_bit_exact():
    straight, _ = _train(CASES["mezo_gaussian"], threads=1, steps=6)
    groups = _model_params()
    params = [p for g in groups for p in g["params"]]
    first = ZOSGD(groups, lr=1e-3, eps=1e-3, chunk_elements=1024, seed=7, threads=2)
    for _ in range(3):
        first.step(lambda: _loss(params))
    saved = copy.deepcopy(first.state_dict())
    second = ZOSGD(groups, lr=1e-3, eps=1e-3, chunk_elements=1024, seed=7, threads=1)
    second.load_state_dict(saved)
    for _ in range(3):
        second.step(lambda: _loss(params))
    for a, b in zip(params, straight, strict=True):
        assert torch.equal(a.detach(), b)


class _Allocations(TorchDispatchMode):
    """Bytes of every storage an operator returns on this thread (thread-local, as the
    benchmarks' and edgetrain's meters are)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                storage = t.untyped_storage()
                self.storages[storage.data_ptr()] = storage.nbytes()
        return out


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_every_buffer_the_workers_write_is_allocated_on_the_calling_thread(direction):
    groups = _model_params()
    params = [p for g in groups for p in g["params"]]
    opt = ZOSGD(groups, lr=1e-3, chunk_elements=1024, direction=direction, threads=2)
    with _Allocations() as meter:
        opt.step(lambda: _loss(params))
    buffers = {b.untyped_storage().data_ptr(): b for b in opt.perturber._buffers.values()}
    assert len(buffers) >= 2 * 2  # the workers' slots (2 per thread) at least
    for ptr, buf in buffers.items():
        assert meter.storages.get(ptr) == buf.untyped_storage().nbytes()
    # chunk-sized temporaries only: the slots cost 2 * threads chunks, not the model
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    assert opt.perturber.buffer_bytes() <= (2 * 2 + 2) * 1024 * 8 < 2 * model_bytes


def test_estimator_zo_threads_reaches_the_optimizer_and_is_validated():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    recipe = Recipe(
        estimator=Estimator(kind="zo", zo_threads=2), optimizer=Optimizer(kind="sgd", lr=1e-3)
    )
    est = build_estimator(model, recipe, seed=0)
    assert est.optimizer.threads == 2
    with pytest.raises(ConfigError, match="zo_threads"):
        Estimator(kind="zo", zo_threads=0)
    with pytest.raises(ConfigError, match="zo_threads"):
        Estimator(kind="backprop", zo_threads=2)
    with pytest.raises(ValueError, match="threads"):
        ZOSGD([nn.Parameter(torch.zeros(3))], threads=0)


def test_zo_threads_is_no_part_of_a_runs_identity():
    """A checkpoint or journal written with one thread count resumes with another: the
    trajectory is the same, so the recipe identity leaves the knob out."""
    one = Recipe(estimator=Estimator(kind="zo"), optimizer=Optimizer(kind="sgd"))
    two = Recipe(estimator=Estimator(kind="zo", zo_threads=2), optimizer=Optimizer(kind="sgd"))
    assert one.identity() == two.identity()
    assert two.identity_differences(one.identity()) == []
    other = Recipe(estimator=Estimator(kind="zo", eps=2e-3), optimizer=Optimizer(kind="sgd"))
    assert other.identity_differences(one.identity()) == ["estimator.eps: 0.001 -> 0.002"]


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 4096])
def test_rademacher_chunk_is_bit_k_of_each_words_low_half(n):
    """The sign expansion (one shift and a copysign) gives the floats of the original
    formula, so journals of earlier runs replay: element 32 w + k of a chunk is -1 where
    bit k of the low 32 bits of word w (``random_`` on int64, seeded from the chunk) is
    set, else +1."""
    from edgetrain.seeding import derive_seed

    perturber = Perturber("rademacher", 4096)
    for seed, key, number in [(0, 0, 0), (123, 4, 7), (2**40 + 5, 17, 2)]:
        z = perturber.direction(seed, key, number, n)
        gen = torch.Generator().manual_seed(derive_seed(seed, key, number))
        words = torch.empty(-(-n // 32), dtype=torch.int64).random_(generator=gen)
        bits = (words.unsqueeze(1) >> torch.arange(32)) & 1  # (W, 32)
        expected = (1 - 2 * bits).reshape(-1)[:n].float()
        assert torch.equal(z, expected)
        assert torch.equal(z.view(torch.int32), expected.view(torch.int32))  # +1.0, not -0

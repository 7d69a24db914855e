"""In-place chunked perturbation (edgetrain.optim.perturb): determinism, restore accuracy,
the chunk bound on temporaries, directions, masks, the chunk plan, and gradient pruning's
supports."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from edgetrain.optim.perturb import (
    Perturber,
    add_direction_,
    direction_range,
    fill_directions_,
    materialize_directions,
    pack_mask,
    plan_chunks,
    prune_,
    pruned_count,
    unpack_mask,
)

DIRECTIONS = ["gaussian", "rademacher"]


def _params(seed: int = 0, sizes=((300, 200), (7,), (64,), (50, 3))) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen) * 0.05 for s in sizes]


class MaxNewStorage(TorchDispatchMode):
    """Largest storage (bytes) created by any operator while active, ignoring storages
    that existed before (the parameters being perturbed in place)."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in existing}
        self.largest = 0
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.known:
                    self.known.add(storage.data_ptr())
                    self.count += 1
                    self.largest = max(self.largest, storage.nbytes())
                    weakref.finalize(storage, self.known.discard, storage.data_ptr())
        return out


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_same_seed_same_weights_different_seed_different(direction):
    a, b, c = _params(), _params(), _params()
    add_direction_(a, seed=7, alpha=1e-2, direction=direction, chunk_elements=1000)
    add_direction_(b, seed=7, alpha=1e-2, direction=direction, chunk_elements=1000)
    add_direction_(c, seed=8, alpha=1e-2, direction=direction, chunk_elements=1000)
    base = _params()
    for pa, pb, pc, p0 in zip(a, b, c, base, strict=True):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, p0)
        assert not torch.equal(pa, pc)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_add_direction_matches_materialized_z(direction):
    params = _params()
    base = [p.clone() for p in params]
    add_direction_(params, seed=3, alpha=0.5, direction=direction, chunk_elements=999)
    zs = materialize_directions(
        [p.shape for p in params], 3, direction=direction, chunk_elements=999
    )
    for p, p0, z in zip(params, base, zs, strict=True):
        torch.testing.assert_close(p, p0 + 0.5 * z, rtol=0, atol=1e-6)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_restore_returns_weights_within_a_few_ulp(direction):
    # +eps z, -2 eps z, +eps z: three float32 roundings, each at most half an ulp of its
    # result, whose magnitude is at most M = |theta| + 2 eps |z|. The error is therefore at
    # most 1.5 ulp(M) (ulp(M) bounds every intermediate's ulp), so 2 ulp(M) must hold.
    params = _params(1, sizes=((400, 300), (33,)))
    base = [p.clone() for p in params]
    eps = 1e-3
    kw = dict(direction=direction, chunk_elements=4096)
    add_direction_(params, 11, eps, **kw)
    add_direction_(params, 11, -2 * eps, **kw)
    add_direction_(params, 11, eps, **kw)
    zs = materialize_directions([p.shape for p in params], 11, **kw)
    exact = 0
    for p, p0, z in zip(params, base, zs, strict=True):
        magnitude = p0.abs() + 2 * eps * z.abs()
        ulp = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude
        assert ((p - p0).abs() <= 2 * ulp).all()
        exact += int((p == p0).sum())
    assert exact > 0.3 * sum(p.numel() for p in params)  # most come back exactly


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_temporary_z_never_exceeds_the_chunk(direction):
    big = torch.randn(100_000)  # 25 chunks of 4096
    with MaxNewStorage([big]) as bounded:
        add_direction_([big], 5, 1e-3, direction=direction, chunk_elements=4096)
    assert bounded.count > 0
    assert bounded.largest <= 4096 * 4  # float32 z; int64 words are 1/4 of that

    # The monitor can fail: one chunk as large as the tensor allocates a full-size z.
    with MaxNewStorage([big]) as unbounded:
        add_direction_([big], 5, 1e-3, direction=direction, chunk_elements=1 << 20)
    assert unbounded.largest >= 100_000 * 4


def test_direction_distributions():
    perturber = Perturber("rademacher", 1 << 16)
    z = perturber.direction(seed=1, param_id=0, chunk_index=0, n=60_000).clone()
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    # mean of n signs: sd 1/sqrt(n) = 0.0041; 5 sd
    assert abs(float(z.mean())) < 5 / 60_000**0.5
    gauss = Perturber("gaussian", 1 << 16).direction(1, 0, 0, 60_000).clone()
    assert abs(float(gauss.mean())) < 5 / 60_000**0.5
    # sample variance of n normals: sd sqrt(2/n) = 0.0058
    assert abs(float(gauss.var()) - 1) < 5 * (2 / 60_000) ** 0.5


def test_chunks_are_independent_of_each_other():
    perturber = Perturber("gaussian", 1000)
    first = perturber.direction(9, 2, 3, 1000).clone()
    perturber.direction(9, 2, 4, 1000)
    assert torch.equal(perturber.direction(9, 2, 3, 1000), first)
    assert not torch.equal(perturber.direction(9, 3, 3, 1000), first)


def test_masks_touch_only_masked_elements():
    params = _params(2)
    base = [p.clone() for p in params]
    masks = [p.abs() <= p.abs().median() for p in params]
    add_direction_(params, 4, 1e-2, masks=masks, chunk_elements=512)
    for p, p0, m in zip(params, base, masks, strict=True):
        changed = p != p0
        assert torch.equal(changed, m)


def test_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 8, 13, 1000):
        mask = torch.rand(n, generator=gen) < 0.3
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
        assert torch.equal(unpack_mask(packed, n), mask)


def test_plan_packs_small_tensors_and_splits_large_ones():
    plan = plan_chunks([10, 2500, 5, 6, 1000, 0, 3], [0, 1, 2, 3, 4, 5, 6], 1000)
    assert all(c.numel <= 1000 for c in plan)
    assert [(c.key, c.number, c.numel) for c in plan] == [
        (0, 0, 10),
        (1, 0, 1000),
        (1, 1, 1000),
        (1, 2, 500),
        (2, 0, 11),
        (4, 0, 1000),
        (6, 0, 3),
    ]
    covered = {}
    for chunk in plan:
        for seg in chunk.segments:
            covered[seg.index] = covered.get(seg.index, 0) + seg.end - seg.start
    assert covered == {0: 10, 1: 2500, 2: 5, 3: 6, 4: 1000, 6: 3}
    # small tensors pack up to the largest one's size, not to a far larger chunk
    small = plan_chunks([10, 20, 30], [0, 1, 2], 1 << 16)
    assert [(c.key, c.numel) for c in small] == [(0, 30), (2, 30)]


def test_non_contiguous_parameter_is_refused_with_advice():
    p = torch.randn(4, 6).t()
    with pytest.raises(ValueError, match="contiguous"):
        add_direction_([p], 0, 1.0)


def test_prune_zeroes_round_r_n_of_each_segment_from_its_seed_alone():
    """Gradient pruning (ZO-Bench): each tensor's piece of a chunk loses round(r n) entries;
    the support depends on (seed, chunk) only, so it regenerates identically."""
    perturber = Perturber("gaussian", 1000)
    plan = plan_chunks([10, 2500, 5, 6], [0, 1, 2, 3], 1000)
    ratios = {0: 0.5, 1: 0.75, 2: 0.3, 3: 0.9}

    def zeros_of(support_seed: int) -> list[torch.Tensor]:
        out = []
        for chunk in plan:
            z = torch.ones(chunk.numel)
            prune_(z, chunk, [ratios[s.index] for s in chunk.segments], support_seed, perturber)
            out.append(z == 0)
        return out

    first = zeros_of(7)
    for chunk, zero in zip(plan, first, strict=True):
        for seg in chunk.segments:
            n = seg.end - seg.start
            count = int(zero[seg.offset : seg.offset + n].sum())
            assert count == math.floor(ratios[seg.index] * n + 0.5), (seg, count)
    assert all(torch.equal(a, b) for a, b in zip(first, zeros_of(7), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, zeros_of(8), strict=True))
    assert pruned_count(0.0, 5) == 0 and pruned_count(0.5, 5) == 3 and pruned_count(0.99, 1) == 1


def test_materialized_pruned_directions_need_the_support_seed():
    with pytest.raises(ValueError, match="support_seed"):
        materialize_directions([(4,)], 0, grad_sparsity=[0.5])
    (z,) = materialize_directions([(1000,)], 0, grad_sparsity=[0.25], support_seed=3)
    (dense,) = materialize_directions([(1000,)], 0)
    kept = z != 0
    assert int((~kept).sum()) == 250 and torch.equal(z[kept], dense[kept])


def test_a_perturbation_below_the_weights_resolution_is_refused_at_once():
    """eps=1e-30 would train with l+ == l- every step: refused when the estimator is
    built, naming the smallest eps that moves half of the weights, which indeed moves
    about half of them (an independent count of theta + eps z != theta)."""
    from edgetrain import estimators, models, presets
    from edgetrain.errors import ConfigError
    from edgetrain.optim.perturb import perturbation_resolution
    from edgetrain.seeding import make_generator

    net = models.build("mlp")
    with pytest.raises(ConfigError, match=r"estimator.eps=1e-30 .* moves half of them is"):
        estimators.build(net, presets.get("mezo", **{"estimator.eps": 1e-30}))
    params = list(net.parameters())
    moved, half_eps = perturbation_resolution(params, 1e-3, "gaussian")
    assert moved == 1.0
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    z = torch.randn(flat.shape, generator=make_generator(0))
    changed = float(((flat + half_eps * z) != flat).float().mean())
    assert 0.35 < changed < 0.65, changed
    with pytest.warns(RuntimeWarning, match="moves only"):
        estimators.build(net, presets.get("mezo", **{"estimator.eps": half_eps / 2}))
    estimators.build(net, presets.get("mezo"))  # MeZO's eps: no warning, no error


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_direction_range_is_the_optimizers_z_of_a_flat_tensor_for_any_range(direction):
    """direction_range(seed, n, start, end, key=k) is entries [start, end) of the z that
    ZOSGD draws for a parameter of n elements with id k (a tensor larger than a chunk),
    regenerated from the seed alone, whatever the range's alignment to chunks."""
    n, chunk = 1000, 128
    (full,) = materialize_directions([(n,)], 11, [3], direction=direction, chunk_elements=chunk)
    whole = direction_range(11, n, key=3, direction=direction, chunk_elements=chunk)
    assert whole.dtype == torch.float32 and torch.equal(whole, full)
    for start, end in [(0, 1), (5, 130), (127, 129), (256, 384), (900, 1000), (400, 400)]:
        part = direction_range(11, n, start, end, key=3, direction=direction, chunk_elements=chunk)
        assert torch.equal(part, full[start:end]), (start, end)
    other = direction_range(11, n, key=4, direction=direction, chunk_elements=chunk)
    assert not torch.equal(other, whole)
    if direction == "rademacher":
        assert set(whole.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match=r"Invalid range \[10, 5\) of a tensor of 1000"):
        direction_range(11, n, 10, 5)


def test_fill_directions_casts_to_the_outputs_dtype_without_the_global_rng():
    shapes = [(40, 3), (7,), (5,)]
    expected = materialize_directions(shapes, 2, chunk_elements=64)
    outs = [torch.empty(s, dtype=torch.float64) for s in shapes]
    rng = torch.get_rng_state()
    fill_directions_(outs, 2, Perturber("gaussian", 64))
    assert torch.equal(torch.get_rng_state(), rng)
    for out, z in zip(outs, expected, strict=True):
        assert out.dtype == torch.float64 and torch.equal(out, z.double())

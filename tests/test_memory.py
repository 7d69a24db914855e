"""The memory meter against facts that can be computed independently."""

import sys

import pytest
import torch
from torch import nn

from edgetrain import memory, presets
from edgetrain.estimators.backprop import Backprop
from edgetrain.memory.measure import StepMeter
from edgetrain.recipe import Estimator, Optimizer, Recipe, Scope

F32 = 4


class TwoLayer(nn.Module):
    """Linear(1000, 500) -> ReLU -> Linear(500, 10): every saved tensor is known."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(1000, 500), nn.ReLU())])
        self.head = nn.Linear(500, 10)

    def forward(self, x):
        return self.head(self.blocks[0](x))


def batch_of(b, d=1000):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, d, generator=g), torch.randint(0, 10, (b,), generator=g)


SGD = Recipe(optimizer=Optimizer(kind="sgd", lr=0.01))
ADAM = Recipe(optimizer=Optimizer(kind="adam", lr=0.01))


def test_parameter_bytes_are_exact():
    net = TwoLayer()
    report = memory.measure(net, SGD, batch_of(8))
    n_params = 1000 * 500 + 500 + 500 * 10 + 10
    assert report.params == n_params * F32
    assert report.trainable_params == n_params * F32
    assert report.grads == n_params * F32  # every trainable parameter gets a .grad
    assert report.batch == 8 * 1000 * F32 + 8 * 8  # float input + int64 labels


def test_saved_activations_match_what_autograd_must_keep():
    # Linear 1 saves its input (the batch itself, not counted as an activation);
    # ReLU saves its output (B x 500); Linear 2 saves its input (the same tensor);
    # cross-entropy saves its log-softmax output (B x 10) and nll_loss its total weight
    # (one float scalar). Independent count:
    b = 16
    report = memory.measure(TwoLayer(), SGD, batch_of(b))
    assert report.saved_activations == b * 500 * F32 + b * 10 * F32 + F32


def test_adam_state_is_at_least_twice_the_trainable_bytes():
    net = TwoLayer()
    report = memory.measure(net, ADAM, batch_of(4))
    assert report.optimizer_state >= 2 * report.trainable_params
    assert memory.measure(net, SGD, batch_of(4)).optimizer_state == 0


@pytest.mark.parametrize("model_name", ["mlp", "vit"])
def test_full_backprop_saved_activations_grow_linearly_with_batch(task, model_name):
    net = task.pretrained(model_name)
    recipe = presets.get("full_bp")
    x, y = task.train.tensors
    sizes = [4, 8, 16]
    saved = [memory.measure(net, recipe, (x[:b], y[:b])).saved_activations for b in sizes]
    per_example = saved[0] / sizes[0]
    assert per_example > 0
    for b, s in zip(sizes, saved, strict=True):
        assert s == pytest.approx(per_example * b, rel=0.02)


def test_frozen_front_stores_far_less_than_full_backprop(task):
    net = task.pretrained("vit")
    x, y = task.train.tensors
    batch = (x[:16], y[:16])
    full = memory.measure(net, presets.get("full_bp"), batch)
    head_only = memory.measure(
        net, Recipe(scope=Scope(kind="last_blocks", k=0), optimizer=Optimizer(lr=0.01)), batch
    )
    last = memory.measure(net, presets.get("last_layers"), batch)
    assert head_only.saved_activations < 0.05 * full.saved_activations
    # One of four blocks trains: roughly a quarter of the blocks' saved tensors.
    assert last.saved_activations < 0.35 * full.saved_activations
    assert last.peak < full.peak


def test_measure_does_not_touch_the_callers_model():
    net = TwoLayer()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    memory.measure(net, ADAM, batch_of(4))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_peak_is_the_sum_of_categories_at_the_peak_moment():
    report = memory.measure(TwoLayer(), ADAM, batch_of(8))
    assert sum(report.at_peak.values()) == report.peak
    assert report.peak >= report.params + report.grads


def test_inference_peak_is_below_a_training_step():
    net = TwoLayer()
    inference = memory.measure_inference(net, batch_of(8))
    step = memory.measure(net, SGD, batch_of(8))
    assert inference.saved_activations == 0 and inference.grads == 0
    assert inference.peak < step.peak
    # The forward's largest live tensor is the (8, 500) hidden activation.
    assert inference.peak - inference.params - inference.batch >= 8 * 500 * F32


def test_tracker_sees_a_known_temporary():
    tracker = memory.StorageTracker()
    with tracker:
        a = torch.zeros(1000)  # 4000 bytes
        b = torch.ones(2000)  # 8000 bytes, both alive
        del a, b
        c = torch.empty(500)  # 2000 bytes
    assert tracker.peak == 12000
    assert tracker.live == 2000
    del c


def test_child_peak_rss_sees_what_the_child_allocated_not_the_parent():
    # A child that touches 256 MiB (a bytes object of 1s) against one that allocates
    # nothing. The parent (pytest with torch loaded) is far bigger than either: a child
    # started from it directly would report the parent's high-water mark (Linux keeps
    # ru_maxrss across exec), the launcher keeps it out.
    mib = 2**20
    base = memory.child_peak_rss([sys.executable, "-c", "pass"]).peak_rss
    big = memory.child_peak_rss(
        [sys.executable, "-c", "b = b'\\x01' * (256 * 2**20); print(len(b))"]
    )
    assert big.stdout.strip() == str(256 * mib)
    assert 2 * mib < base < 64 * mib < memory.maxrss_bytes()
    assert 256 * mib <= big.peak_rss <= 256 * mib + base + 16 * mib


def test_child_peak_rss_reports_failures_and_timeouts():
    with pytest.raises(RuntimeError, match="failed \\(3\\).*boom"):
        memory.child_peak_rss(
            [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]
        )
    with pytest.raises(TimeoutError, match="longer than 0.5 s"):
        memory.child_peak_rss([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)


@pytest.mark.slow
def test_peak_rss_of_a_child_run(task):
    from edgetrain.bench.rss_run import peak_rss

    recipe = presets.get("last_layers")
    rss = peak_rss("mnist-to-digits", "mlp", recipe, steps=3)
    assert 10 * 2**20 < rss["loaded_rss"] <= rss["peak_rss"] < 4 * 2**30


def test_estimator_rejects_zero_order_backward_combination():
    with pytest.raises(ValueError):
        Recipe(estimator=Estimator(kind="forward_grad"), backward={"kind": "wht"})


def test_peak_carries_lazily_created_optimizer_state_through_the_next_step():
    # Adam creates its moments after the first step's backward has peaked; from the
    # second step on they are live during forward and backward, so they are in the peak.
    net = TwoLayer()
    sgd = memory.measure(net, SGD, batch_of(8))
    adam = memory.measure(net, ADAM, batch_of(8))
    assert adam.at_peak["optimizer_state"] == adam.optimizer_state >= 2 * adam.trainable_params
    assert adam.peak >= sgd.peak + 2 * adam.trainable_params


class BackpropWithLocalHead(Backprop):
    """Backprop plus a head of the estimator's own (a local parameter, issue 17): a
    ``Linear(1000, 10)`` on the input, trained by its cross-entropy beside the model's."""

    def __init__(self, model, recipe):
        super().__init__(model, recipe)
        self.local_head = nn.Linear(1000, 10)
        self.optimizer = torch.optim.Adam([*self.params, *self.local_head.parameters()], lr=0.01)

    def local_parameters(self):
        return list(self.local_head.parameters())

    def _step(self, batch):
        x, y = batch
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, batch) + nn.functional.cross_entropy(self.local_head(x), y)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), 1, 1


def test_local_parameters_are_their_own_category_their_grads_and_moments_counted():
    net = TwoLayer()
    est = BackpropWithLocalHead(net, ADAM)
    batch = batch_of(8)
    try:
        meter = StepMeter(net, est, [batch])
        for _ in range(2):
            with meter.step():
                est.step(batch)
        report = meter.report()
    finally:
        est.close()
    plain = memory.measure(TwoLayer(), ADAM, batch)
    n_local = (1000 * 10 + 10) * F32
    assert report.local_params == report.at_peak["local_params"] == n_local
    assert plain.local_params == plain.at_peak["local_params"] == 0
    assert report.params == plain.params and report.trainable_params == plain.trainable_params
    assert report.grads == plain.grads + n_local  # the local head's .grad counts as a grad
    assert report.optimizer_state >= plain.optimizer_state + 2 * n_local  # its Adam moments
    assert sum(report.at_peak.values()) == report.peak
    assert report.peak >= plain.peak + 3 * n_local  # itself and two moments, all along
    assert "local_params" in str(report) and "local_params" not in str(plain)
    assert report.to_dict()["local_params"] == n_local


def test_a_stand_in_estimator_without_local_parameters_meters():
    class StandIn:  # what a benchmark passes: state_tensors() only
        def state_tensors(self):
            return iter(())

    net = TwoLayer()
    batch = batch_of(4)
    meter = StepMeter(net, StandIn(), [batch])
    with meter.step():
        nn.functional.cross_entropy(net(batch[0]), batch[1]).backward()
    report = meter.report()
    assert report.local_params == 0 and report.grads == report.trainable_params

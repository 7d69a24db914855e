"""A zeroth-order step runs at inference memory: its measured peak is at most the
inference peak plus the bound on the temporary z chunk, plus 5% (issue 3)."""

import pytest

from edgetrain import memory, presets
from edgetrain.train import BatchSampler

F32 = 4


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "vit"])
@pytest.mark.parametrize("preset", ["mezo", "sparse_mezo", "zo_sign"])
def test_zo_step_peak_is_inference_peak_plus_chunk(task, model_name, preset):
    net = task.pretrained(model_name)
    recipe = presets.get(preset)
    batch = BatchSampler(task.train, recipe.batch_size, seed=0).batch(0)
    inference = memory.measure_inference(net, batch)
    step = memory.measure(net, recipe, batch)
    # z lives in a buffer of at most chunk_elements floats. Sparse MeZO also holds, for
    # the step, the mask packed at one bit per weight, and per chunk a bool mask plus the
    # two one-byte temporaries of unpacking it: 3 more bytes per chunk element.
    chunk = recipe.estimator.chunk_elements
    chunk_bound = chunk * F32
    if recipe.estimator.sparsity:
        chunk_bound += 3 * chunk + step.trainable_params // 32 + 64
    assert step.saved_activations == 0 and step.grads == 0
    assert step.peak <= (inference.peak + chunk_bound) * 1.05, (
        f"{preset}/{model_name}: step {step.peak} vs inference {inference.peak} "
        f"+ chunk {chunk_bound}"
    )


def test_zo_adam_state_is_reported_as_optimizer_state(task):
    net = task.pretrained("mlp")
    recipe = presets.get("zo_adam")
    batch = BatchSampler(task.train, recipe.batch_size, seed=0).batch(0)
    step = memory.measure(net, recipe, batch)
    assert step.optimizer_state >= 2 * step.trainable_params

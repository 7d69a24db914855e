"""A long-sequence language-modelling task: next-byte prediction on the polarity corpus.

``polarity_lm`` (issue 18, item 4: StreamBP's task): the 4,000 sentences of Pang & Lee's
sentence polarity corpus (edgetrain.data.polarity, fetched on first use, never shipped),
in file order, joined by newlines and read as UTF-8 bytes (vocabulary 256: no tokenizer,
about 457,000 bytes). The byte stream is cut into non-overlapping windows of
``seq_len + 1`` bytes; each window is one example, ``input_ids`` its first ``seq_len``
bytes and ``labels`` its last ``seq_len`` (pre-shifted next tokens, the convention of
edgetrain.models.causal_lm). The last tenth of the stream (by bytes, whole windows) is
the test set, the rest the training set: contiguous text, never a window in both.
Accuracy is next-byte accuracy over the test positions (edgetrain.evaluate), the loss
the mean cross-entropy per byte (nats).

From scratch (``Task.from_scratch``): a run of seed ``s`` starts from a fresh
``causal_lm`` of ``LM_CONFIG`` (dim 64, 4 blocks, 4 heads, learned positions of
``seq_len``), seeded by ``s``. ``polarity_lm`` has ``seq_len`` 1,024 (416 training and
44 test windows); ``polarity_lm-4k`` 4,096 and ``polarity_lm-16k`` 16,384 (25 training,
2 test windows) are the same text in longer windows; ``polarity_lm_task(seq_len)``
builds any other length. Every preset runs with batches of ``LM_BATCH`` sequences
(``adapt_for_lm``).
"""

from __future__ import annotations

import torch
from torch.utils.data import StackDataset

from edgetrain.recipe import Recipe
from edgetrain.tasks.base import Task, register

__all__ = ["polarity_lm_task", "polarity_bytes", "byte_windows", "LM_CONFIG", "LM_BATCH"]

LM_CONFIG = {"vocab_size": 256, "dim": 64, "depth": 4, "num_heads": 4}
"""The causal LM of the task (edgetrain.models.CausalLM keyword arguments)."""
LM_BATCH = 4
"""Sequences per batch of every preset on the task."""
TEST_FRACTION = 0.1


def polarity_bytes() -> torch.Tensor:
    """The corpus as one stream of UTF-8 bytes (int64), sentences joined by newlines."""
    from edgetrain.data.polarity import fetch_polarity_csv, read_polarity

    texts, _ = read_polarity(fetch_polarity_csv())
    data = "\n".join(texts).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def byte_windows(stream: torch.Tensor, seq_len: int) -> StackDataset:
    """Non-overlapping windows of ``seq_len + 1`` bytes: items ``{"input_ids", "labels"}``,
    each (seq_len,), labels the input shifted by one."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(stream)} bytes hold no window of {seq_len + 1}")
    ids = stream[: n * seq_len].reshape(n, seq_len)  # (n, seq_len)
    labels = stream[1 : n * seq_len + 1].reshape(n, seq_len)  # (n, seq_len): next bytes
    return StackDataset(input_ids=ids.clone(), labels=labels.clone())


def adapt_for_lm(recipe: Recipe) -> Recipe:
    """Every preset on batches of ``LM_BATCH`` sequences (a batch of 32 sequences of
    1,024 bytes is 32,768 positions, far past a memory budget's point)."""
    return recipe.replace(batch_size=LM_BATCH)


def polarity_lm_task(seq_len: int = 1024, *, name: str | None = None) -> Task:
    """The next-byte task on windows of ``seq_len`` bytes (the module docstring)."""
    if seq_len < 1:
        raise ValueError(f"Invalid seq_len: {seq_len} (bytes, >= 1)")

    def load_target() -> tuple[StackDataset, StackDataset]:
        stream = polarity_bytes()
        cut = int(len(stream) * (1 - TEST_FRACTION))
        return byte_windows(stream[:cut], seq_len), byte_windows(stream[cut:], seq_len)

    def load_source() -> StackDataset:
        return load_target()[0]  # from scratch: nothing is pretrained elsewhere

    return Task(
        name=name or f"polarity_lm-{seq_len}",
        description=(
            f"Next-byte prediction on Pang & Lee's sentence polarity corpus (4,000 "
            f"movie-review sentences as UTF-8 bytes, fetched on first use) in windows of "
            f"{seq_len:,} bytes; the last tenth of the text held out; a causal LM from "
            "scratch."
        ),
        num_classes=256,
        input_shape=(seq_len,),
        load_source=load_source,
        load_target=load_target,
        model_names=("causal_lm",),
        default_model="causal_lm",
        adapt_recipe=adapt_for_lm,
        from_scratch=True,
        model_kwargs={"causal_lm": {**LM_CONFIG, "max_len": seq_len}},
        eval_batch_size=LM_BATCH,
    )


register(lambda: polarity_lm_task(1024, name="polarity_lm"), "polarity_lm")
register(lambda: polarity_lm_task(4096, name="polarity_lm-4k"), "polarity_lm-4k")
register(lambda: polarity_lm_task(16384, name="polarity_lm-16k"), "polarity_lm-16k")

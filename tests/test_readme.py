"""The README's examples run as they are written (issue 14, item 6).

Every fenced ```python block of README.md is executed, each in a namespace of its own,
with the working directory a fresh temporary folder, one thread (conftest), progress bars
off and the global RNG restored afterwards; a block that raises fails its test. A block
that is not meant to run is fenced as ```text or ```bash; any other fence (an untagged
one included) fails ``test_every_fence_says_what_it_is``, so nothing is silently skipped.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
RUNNABLE = "python"
NOT_RUN = ("text", "bash")
_FENCE = re.compile(r"^```(\S*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def fences(text: str) -> list[tuple[str, int, str]]:
    """``(language, first line of the code, code)`` of every fenced block."""
    return [
        (m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in _FENCE.finditer(text)
    ]


BLOCKS = [(line, code) for lang, line, code in fences(README.read_text()) if lang == RUNNABLE]


def test_every_fence_says_what_it_is():
    found = fences(README.read_text())
    assert found, "README.md has no fenced block"
    bad = [(lang or "(none)", line) for lang, line, _ in found if lang not in (RUNNABLE, *NOT_RUN)]
    assert not bad, f"fences that are neither python (run) nor text/bash (not run): {bad}"
    # Every fence was matched: an odd count of ``` lines would leave one unpaired.
    assert sum(1 for line in README.read_text().splitlines() if line.startswith("```")) == (
        2 * len(found)
    )


def test_the_public_api_has_its_examples():
    code = "\n".join(code for _, code in BLOCKS)
    for name in (
        "edgetrain.finetune(",
        "edgetrain.presets.get(",
        "checkpoint_dir=",
        "edgetrain.measure(",
        "edgetrain.plan.plan_model(",
        "AutoModelForSequenceClassification",
        "StackDataset(",
        "ZOSGD(",
        "ForwardGradient(",
        "zo_closure(",
        "lr_scheduler.",
        ".load_state_dict(",
        "GaLoreAdamW(",
    ):
        assert name in code, f"no README example uses {name}"


@pytest.fixture
def quiet_bars(monkeypatch):
    """edgetrain's progress bars (``tqdm.auto.tqdm``, looked up at each call) disabled."""
    import tqdm.auto

    if importlib.util.find_spec("huggingface_hub") is not None:
        import huggingface_hub  # noqa: F401 - it subclasses tqdm on import: the real one

    class QuietBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", QuietBar)


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_example_runs(line, code, tmp_path, monkeypatch, quiet_bars):
    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers (pip install -e '.[text]')")
    monkeypatch.chdir(tmp_path)
    # Padded so that a traceback names the README's own line numbers.
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    with torch.random.fork_rng(devices=[]):
        exec(compiled, {"__name__": "__readme__"})

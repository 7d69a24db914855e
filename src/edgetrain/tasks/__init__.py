"""Built-in tasks: data, pretrained models, and the accuracy before fine-tuning.

``get(name)`` returns a :class:`Task` (edgetrain.tasks.base). Registered here:
``mnist-to-digits`` (base.py: a reference model pretrained on real MNIST, adapted to the
UCI digits) and ``minilm-polarity`` (text.py: the pretrained MiniLM encoder with a
linear-probe head on Pang & Lee's sentence polarity) and ``polarity_lm`` (lm.py: next-byte
prediction on the same corpus by a causal LM from scratch, windows of 1,024 bytes;
``polarity_lm-4k``, ``polarity_lm-16k``).
"""

from edgetrain.tasks import lm as _lm  # noqa: F401 - registers "polarity_lm"
from edgetrain.tasks import text as _text  # noqa: F401 - registers "minilm-polarity"
from edgetrain.tasks.base import (
    PretrainConfig,
    Task,
    _load_cache,
    cache_dir,
    get,
    names,
    register,
)

__all__ = ["Task", "PretrainConfig", "get", "names", "cache_dir", "register", "_load_cache"]

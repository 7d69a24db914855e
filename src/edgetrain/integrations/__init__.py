"""Adapters that bring models from other libraries under every edgetrain recipe.

``edgetrain.integrations.hf``: HuggingFace transformers models with their own dict
batches; ``HFClassifier`` puts a new head on a base model; the structure rules of
BERT-style encoders (token dropping) are registered on import. transformers itself is
imported only when a model is loaded: ``pip install 'edgetrain[text]'``.
"""

from edgetrain.integrations.hf import (
    HFClassifier,
    attn_implementation_for,
    load_classifier,
    tokenize,
    use_eager_attention,
)

__all__ = [
    "HFClassifier",
    "attn_implementation_for",
    "load_classifier",
    "tokenize",
    "use_eager_attention",
]

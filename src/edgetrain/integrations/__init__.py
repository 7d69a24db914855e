"""Adapters that bring models from other libraries under every edgetrain recipe.

``edgetrain.integrations.hf``: HuggingFace transformers models as ``(x, y)`` classifiers
(x packs input_ids and attention_mask as one ``(B, 2, T)`` tensor). transformers itself is
imported only when a model is loaded: ``pip install 'edgetrain[text]'``.
"""

from edgetrain.integrations.hf import (
    HFClassifier,
    attn_implementation_for,
    load_classifier,
    output_loss,
    pack_inputs,
    unpack_inputs,
    use_eager_attention,
)

__all__ = [
    "HFClassifier",
    "attn_implementation_for",
    "load_classifier",
    "output_loss",
    "pack_inputs",
    "unpack_inputs",
    "use_eager_attention",
]

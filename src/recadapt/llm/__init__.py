"""Pretrained language-model backbones: :func:`load_backbone` returns a :class:`Backbone` (model, tokenizer,
device, precision)."""

from recadapt.llm.backbone import DEFAULT_BACKBONE, Backbone, BackboneError, load_backbone

__all__ = ["DEFAULT_BACKBONE", "Backbone", "BackboneError", "load_backbone"]

"""Encoders that embed images and text for retrieval: CLIP (open_clip) and an offline encoder.

Built-in names: ``clip-vit-b-32`` and ``clip-vit-l-14`` (:mod:`.clip`, the RDM retrieval encoders) and
``offline-lite0-minilm`` (:mod:`.offline`, weights shipped in pip packages). Registration is lazy: open_clip,
sentence-transformers and the towers are imported only when :func:`get_encoder` builds one.
"""

from __future__ import annotations

from functools import partial

import torch

from .base import (Encoder, EncoderUnavailable, embed_images, embed_texts, get_encoder, list_encoders,
                   query_encoder, register_encoder, resolve_encoder)

__all__ = ["Encoder", "EncoderUnavailable", "embed_images", "embed_texts", "get_encoder", "list_encoders",
           "query_encoder", "register_encoder", "resolve_encoder"]


def _clip(name: str, *, device: str | torch.device, checkpoint: str | None, pretrained: bool) -> Encoder:
    from .clip import build

    return build(name, device=device, checkpoint=checkpoint, pretrained=pretrained)


def _offline(*, device: str | torch.device, checkpoint: str | None, pretrained: bool) -> Encoder:
    from .offline import build

    return build(device=device, checkpoint=checkpoint, pretrained=pretrained)


for _name in ("clip-vit-b-32", "clip-vit-l-14"):
    register_encoder(_name, partial(_clip, _name), replace=True)
register_encoder("offline-lite0-minilm", _offline, replace=True)

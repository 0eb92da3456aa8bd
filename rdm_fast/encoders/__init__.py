"""Encoders that embed images and text for retrieval: CLIP (open_clip) and an offline encoder.

Built-in names: ``clip-vit-b-32`` and ``clip-vit-l-14`` (:mod:`.clip`, the RDM retrieval encoders) and
``offline-lite0-minilm`` (:mod:`.offline`, weights shipped in pip packages). Registration is lazy: open_clip,
sentence-transformers and the towers are imported only when :func:`get_encoder` builds one.
"""

from __future__ import annotations

from functools import partial

import torch

from .._distributed import parse_device
from . import base as _base
from .base import (Encoder, EncoderUnavailable, embed_images, embed_texts, get_encoder, list_encoders,
                   register_encoder, resolve_encoder)

__all__ = ["Encoder", "EncoderUnavailable", "embed_images", "embed_texts", "get_encoder", "list_encoders",
           "query_encoder", "register_encoder", "resolve_encoder"]


def _clip(name: str, *, device: str | torch.device, checkpoint: str | None, pretrained: bool,
          precision: str | None = None) -> Encoder:
    from .clip import build

    return build(name, device=device, checkpoint=checkpoint, pretrained=pretrained, precision=precision)


def _offline(*, device: str | torch.device, checkpoint: str | None, pretrained: bool) -> Encoder:
    from .offline import build

    return build(device=device, checkpoint=checkpoint, pretrained=pretrained)


for _name in ("clip-vit-b-32", "clip-vit-l-14"):
    register_encoder(_name, partial(_clip, _name), replace=True)
register_encoder("offline-lite0-minilm", _offline, replace=True)


def query_encoder(spec: str, *, device: str | torch.device = "cpu", checkpoint: str | None = None) -> Encoder:
    """The encoder ``spec`` (as for :func:`resolve_encoder`) for embedding queries when sampling or searching.
    The built-in CLIP encoders run their towers in float32 on any device: the reference's sampling scripts embed
    their captions and query images so (``clip.load`` on the CPU, then moved), while databases are embedded in
    the default precision (float16 towers on a GPU, as the reference embedded its databases). Other encoders are
    built as :func:`resolve_encoder` builds them."""
    factory = _base._REGISTRY.get(spec)
    if isinstance(factory, partial) and factory.func is _clip:  # not a user's factory registered under the name
        parse_device(device)
        return _clip(spec, device=device, checkpoint=checkpoint, pretrained=True,
                     precision="fp32").eval().requires_grad_(False)
    return resolve_encoder(spec, device=device, checkpoint=checkpoint)

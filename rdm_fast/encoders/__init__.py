"""Encoders that embed images and text for retrieval: CLIP (open_clip) and an offline encoder."""

from .base import Encoder, EncoderUnavailable, get_encoder, list_encoders, register_encoder

__all__ = ["Encoder", "EncoderUnavailable", "get_encoder", "list_encoders", "register_encoder"]

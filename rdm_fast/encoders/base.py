"""The encoder interface shared by databases, retrieval and sampling, and the registry of encoders by name.

An encoder maps images (and, where it has a text tower, captions) into one embedding space. Every encoder
declares its ``name``, its output ``dim`` and whether its outputs are already L2-``normalized``; a database
records these and refuses queries made by another encoder.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .._distributed import parse_device
from ..images import check_image_range

log = logging.getLogger("rdm_fast.encoders")


class EncoderUnavailable(RuntimeError):
    """An encoder cannot be built here (missing weights or packages); the message says how to fix it."""


class Encoder(nn.Module, ABC):
    """Images in [-1, 1] (B, 3, H, W) of any size, or a list of strings -> (B, dim) float32 embeddings."""

    name: str
    dim: int
    normalized: bool
    image_size: int

    @abstractmethod
    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float images in [-1, 1] -> (B, dim) float32, on the encoder's device."""

    @abstractmethod
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """A list of B captions -> (B, dim) float32, on the encoder's device."""

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights live (cpu when it has none)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def info(self) -> dict:
        """What a database records about the encoder that made it."""
        return {"name": self.name, "dim": self.dim, "normalized": self.normalized}

    def check_images(self, images: Tensor) -> None:
        """Raise ValueError unless ``images`` is a float (B, 3, H, W) batch (TypeError unless it is a tensor)."""
        if not isinstance(images, Tensor):  # encode_images(array) failed with "'numpy.ndarray' ... no attribute 'dim'"
            raise TypeError(f"{self.name}: images must be a torch.Tensor (B, 3, H, W) in [-1, 1], got "
                            f"{type(images).__name__} (a NumPy array: torch.from_numpy(a))")
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"{self.name}: expected float images (B, 3, H, W) in [-1, 1], "
                             f"got {images.dtype} {tuple(images.shape)}")

    def check_texts(self, texts: Sequence[str]) -> list[str]:
        """The captions as a non-empty list of str; TypeError/ValueError otherwise (a bare str is refused: it
        would otherwise be read as a list of characters)."""
        if isinstance(texts, str):
            raise TypeError(f"{self.name}: expected a list of captions, got a single str (wrap it in a list)")
        texts = list(texts)
        if not texts:
            raise ValueError(f"{self.name}: expected at least one caption, got an empty list")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"{self.name}: captions must be str, got {type(t).__name__}")
            try:  # lone surrogates: the bytes of a command line that was not UTF-8 (tokenizers failed on them)
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{self.name}: caption {t!r} is not valid text (character {e.start} is a byte "
                                 "that is not UTF-8, e.g. from a terminal or file in another encoding)") from None
        return texts


def _checked(encoder: Encoder, emb: Tensor, n: int, what: str) -> Tensor:
    if not isinstance(emb, Tensor) or emb.shape != (n, encoder.dim):
        got = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
        raise ValueError(f"encoder {encoder.name} returned {got} for {n} {what}; it declares {encoder.dim}-d "
                         f"embeddings, so ({n}, {encoder.dim}) was expected")
    return emb


def check_encoder_arg(encoder: Encoder, where: str, name: str = "encoder") -> None:
    """TypeError naming ``name`` unless ``encoder`` is an :class:`Encoder` (a registered name is not built here:
    ``get_encoder(name)`` builds it once, loading its weights)."""
    if not isinstance(encoder, Encoder):
        hint = (f" (build it once with rdm_fast.encoders.get_encoder({encoder!r}) and pass that)"
                if isinstance(encoder, str) else "")
        raise TypeError(f"{where}: {name} must be an rdm_fast.encoders.Encoder, got {type(encoder).__name__}{hint}")


def embed_images(encoder: Encoder, images: Tensor) -> Tensor:
    """``encoder.encode_images(images)``, checked to be (B, encoder.dim): a custom encoder that declares another
    width fails here, not in every later use of what it made (a database, a search). ``images`` must be a
    tensor (TypeError); CPU images far outside [-1, 1] (0-255 pixels as floats) are warned about."""
    check_encoder_arg(encoder, "embed_images")
    if not isinstance(images, Tensor):
        raise TypeError(f"{encoder.name}: images must be a torch.Tensor (B, 3, H, W) in [-1, 1], got "
                        f"{type(images).__name__} (a NumPy array: torch.from_numpy(a))")
    check_image_range(images, encoder.name, "the encoder")
    return _checked(encoder, encoder.encode_images(images), images.shape[0], "images")


def embed_texts(encoder: Encoder, texts: Sequence[str]) -> Tensor:
    """``encoder.encode_text(texts)``, checked as :func:`embed_images` (a bare str is refused: it is no list)."""
    check_encoder_arg(encoder, "embed_texts")
    if isinstance(texts, str):
        raise TypeError(f"{encoder.name}: expected a list of captions, got a single str (wrap it in a list)")
    if not isinstance(texts, Iterable):
        raise TypeError(f"{encoder.name}: expected a list of captions, got {type(texts).__name__}")
    texts = list(texts)
    return _checked(encoder, encoder.encode_text(texts), len(texts), "captions")


EncoderFactory = Callable[..., Encoder]
_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str, factory: EncoderFactory, *, replace: bool = False) -> None:
    """Make ``get_encoder(name, ...)`` call ``factory(device=..., checkpoint=..., pretrained=...)``."""
    if not isinstance(name, str):
        raise TypeError(f"register_encoder: name must be a non-empty str, got {name!r}")
    if not name:
        raise ValueError("register_encoder: name must be a non-empty str, got ''")
    if not callable(factory):  # it failed at the first get_encoder, "'int' object is not callable"
        raise TypeError(f"register_encoder: factory must be callable as factory(device=..., checkpoint=..., "
                        f"pretrained=...), got {type(factory).__name__}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"an encoder named {name!r} is already registered")
    _REGISTRY[name] = factory


def list_encoders() -> list[str]:
    """Names accepted by :func:`get_encoder`."""
    return sorted(_REGISTRY)


def get_encoder(name: str, *, device: str | torch.device = "cpu", checkpoint: str | None = None,
                pretrained: bool = True) -> Encoder:
    """Build the encoder registered as ``name`` in eval mode on ``device``.

    ``checkpoint`` is a local weights file (overrides any default source); ``pretrained=False`` builds the
    architecture with random weights (tests, benchmarks). Raises :class:`EncoderUnavailable` with a one-line
    hint when weights or packages are missing; ValueError for an unknown name or device, or a GPU this machine
    lacks, and for a registered factory that returns no :class:`Encoder`.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(list_encoders()) or 'none'}")
    parse_device(device)
    encoder = _REGISTRY[name](device=device, checkpoint=checkpoint, pretrained=pretrained)
    if not isinstance(encoder, Encoder):
        raise ValueError(f"encoder {name!r}: its registered factory returned a {type(encoder).__name__!r} object, "
                         "not an Encoder")
    return encoder.eval().requires_grad_(False)


def resolve_encoder(spec: str, *, device: str | torch.device = "cpu", checkpoint: str | None = None,
                    pretrained: bool = True) -> Encoder:
    """An encoder from a registered name, or from ``"package.module:factory"``: the module is imported and
    ``factory(device=..., checkpoint=..., pretrained=...)`` must return an :class:`Encoder` (how users plug
    their own encoders into the command line)."""
    if spec in _REGISTRY or ":" not in spec:
        return get_encoder(spec, device=device, checkpoint=checkpoint, pretrained=pretrained)
    module_name, _, attr = spec.partition(":")
    parse_device(device)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ValueError(f"encoder {spec!r}: cannot import module {module_name!r} ({e})") from None
    except AttributeError:
        raise ValueError(f"encoder {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    try:
        inspect.signature(factory).bind(device=device, checkpoint=checkpoint, pretrained=pretrained)
    except TypeError as e:  # not callable, or another signature
        raise ValueError(f"encoder {spec!r}: {attr} must be a factory callable as {attr}(device=..., "
                         f"checkpoint=..., pretrained=...) returning an Encoder ({e})") from None
    except ValueError:  # no signature to inspect (some builtins): let the call decide
        pass
    encoder = factory(device=device, checkpoint=checkpoint, pretrained=pretrained)
    if not isinstance(encoder, Encoder):
        raise ValueError(f"encoder {spec!r}: {attr}(...) returned a {type(encoder).__name__!r} object, not an "
                         "Encoder")
    return encoder.eval().requires_grad_(False)

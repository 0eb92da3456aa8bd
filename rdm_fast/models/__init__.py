"""Networks of an RDM: the denoising UNet and the first-stage autoencoders."""

from .autoencoder import Autoencoder
from .unet import UNet

__all__ = ["UNet", "Autoencoder"]

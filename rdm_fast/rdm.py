"""``RDM``: a retrieval-augmented latent diffusion model — UNet, first-stage autoencoder and noise schedule."""

from __future__ import annotations

import functools
import logging
import math
import numbers
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import ops
from ._distributed import parse_device
from .config import ConfigError, RDMConfig, preset_names
from .diffusion import Schedule, guided, sample_ddim, sample_plms
from .diffusion.samplers import Generators, check_generator, draw_noise
from .diffusion.graphs import GraphCache
from .images import check_image_range
from .models import Autoencoder, UNet
from .models.layers import cache_updates, current_device, official_names, refresh_cached

log = logging.getLogger(__name__)

RUN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the precisions the model's kernels run in


def _run_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` for :meth:`RDM.from_config` / :meth:`RDM.from_pretrained` (None: float32); ValueError unless the
    model can run in it."""
    if dtype is None:
        return torch.float32
    if dtype not in RUN_DTYPES:
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16 (the precisions the model "
                         f"runs in; None: float32), got {dtype!r}")
    return dtype


def _check_tensor(value: Any, name: str, shape: str, device: torch.device) -> None:
    """TypeError unless ``value`` is a tensor (NumPy arrays, lists and None are not converted silently);
    ValueError for a meta tensor (shapes only) given to a model on a real device."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(value).__name__}")
    if value.is_meta and device.type != "meta":
        raise ValueError(f"{name} is on the meta device (shapes without values); the model runs on {device}")


NORM_LIMIT = math.sqrt(torch.finfo(torch.float32).max)  # a longer embedding's float32 norm overflows: normalised,
# it became all zeros, the unconditional context


def _runnable(t: Tensor) -> Tensor:
    """``t``, float64 as float32 (the model runs in float32, float16 or bfloat16)."""
    return t.float() if t.dtype == torch.float64 else t


def _check_finite_on_cpu(value: Tensor, name: str) -> None:
    """ValueError if a CPU tensor holds NaN or infinity (device tensors are not checked: no host synchronisation)."""
    if value.device.type == "cpu" and value.is_floating_point() and value.numel() and \
            not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or infinite values")


def to_channels_last(module: nn.Module) -> None:
    """Convert ``module``'s 4-D weights to the channels-last layout in place. Done outside inference mode even
    when called inside it: weights made there would be inference tensors, which autograd refuses afterwards
    (training, or a gradient through the decoder)."""
    with torch.inference_mode(False), torch.no_grad():
        module.to(memory_format=torch.channels_last)


P = ParamSpec("P")
T = TypeVar("T")


def on_own_device(method: Callable[Concatenate[RDM, P], T]) -> Callable[Concatenate[RDM, P], T]:
    """Run an ``RDM`` method with the model's GPU current (:func:`~rdm_fast.models.layers.current_device`): its
    sampler steps and CUDA graphs as well as the networks' kernels."""
    @functools.wraps(method)
    def wrapper(self: RDM, *args: P.args, **kwargs: P.kwargs) -> T:
        with current_device(self.device):
            return method(self, *args, **kwargs)
    return wrapper


class RDM(nn.Module):
    """A retrieval-augmented diffusion model.

    ``rdm.unet(x, t, context) -> eps`` is the denoiser; ``rdm.encode``/``rdm.decode`` map between images in
    [-1, 1] and scaled latents; ``rdm.sample(context)`` runs DDIM or PLMS with classifier-free guidance.
    The context is (B, k, D): the CLIP embeddings of the retrieved neighbours (plus the query or text
    embedding first, by the model's convention), D = ``config.context_dim``.
    """

    def __init__(self, config: RDMConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet_config)
        # frozen, as in the paper: encode/decode then build no autograd graph unless their input asks for one
        self.first_stage = Autoencoder(config.first_stage_config).requires_grad_(False)
        self.schedule = Schedule.linear(config.linear_start, config.linear_end, config.timesteps)
        self._graphs = GraphCache()  # the last captured guided step, reused by the next batch of the same shapes
        self._warned_lengths: set[int] = set()  # context lengths outside the conventions, warned about once
        self._said_float32_eager = False  # that float32 sampling on CUDA runs eagerly by default (logged once)

    # ------------------------------------------------------------------ construction and checkpoints
    @classmethod
    def from_config(cls, config: str | Path | dict | RDMConfig, *, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> "RDM":
        """A randomly initialised model (as training starts) of a preset name, YAML path or config.

        ``dtype``: the precision it runs in, torch.float32 (None, the default), torch.float16 or torch.bfloat16
        (ValueError for any other: the kernels take no float64 or integers)."""
        dtype, device = _run_dtype(dtype), parse_device(device if device is not None else "cpu")
        cfg = RDMConfig.resolve(config)
        with device:
            model = cls(cfg)
        return model.to(dtype=dtype).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, config: str | Path | dict | RDMConfig | None = None, *,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        use_ema: bool = True, allow_pickle: bool = False) -> "RDM":
        """Load an official Lightning ``.ckpt`` (or a folder holding one) or an rdm_fast directory / ``.safetensors``.

        ``config``: a preset name, a ``config.yaml`` path or an RDMConfig; when omitted, rdm_fast files use
        the config they carry and official checkpoints use ``config.yaml`` beside them, else the preset whose
        tensor names and shapes they match. Every tensor is checked by name and shape; missing or mis-shaped
        tensors raise CheckpointError listing them, unexpected ones are reported and skipped.
        ``use_ema=False`` takes the UNet's raw weights: an official file's ``model.diffusion_model.*``, or the
        ``train_weights.safetensors`` beside a training checkpoint of ``python -m rdm_fast.train`` (whose
        ``model.safetensors`` holds the EMA UNet); other rdm_fast files hold one set of weights (a warning says so).
        ``allow_pickle`` permits full unpickling of trusted torch files (weights_only=False). ``device`` and
        ``dtype`` (default: the CPU, float32, whatever precision the file stores) are where and how the model runs;
        ``dtype`` is torch.float32, torch.float16 or torch.bfloat16 (ValueError for any other: the kernels take no
        float64 or integers).
        """
        dtype, device = _run_dtype(dtype), parse_device(device if device is not None else "cpu")
        path = ckpt.resolve_file(path)
        state, metadata = ckpt.read_state_dict(path, allow_pickle=allow_pickle)
        own = metadata.get("format") == ckpt.FORMAT_NAME or _is_own_layout(state)
        if config is None and own:
            tree = ckpt.read_own_config(metadata, path)
            if tree is None:
                raise ckpt.CheckpointError(f"{path} carries no config: pass config= (--config on the command "
                                           "line)")
            config = RDMConfig.from_dict(tree)
        elif config is None:
            config = _config_for_official(state, path)
        source = str(path)
        if own and not use_ema:
            state, source = _with_train_weights(state, path)
        model = cls.from_state_dict(state, config, use_ema=use_ema, source=source)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], config: str | Path | dict | RDMConfig, *,
                        use_ema: bool = True, source: str = "state dict") -> "RDM":
        """Build a model from an official-layout or rdm_fast-layout state dict, checking every tensor.

        The model's tensors are the ones in ``state`` (no copies beyond dtype/device moves done later), except
        float64 ones, which become float32: the kernels take no float64."""
        cfg = RDMConfig.resolve(config)
        with torch.device("meta"):
            model = cls(cfg)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if _is_own_layout(state):
            sources = {k: k for k in shapes}
            unexpected = [k for k in state if k not in shapes]
        else:
            names = model.official_names()
            sources = ckpt.official_sources(state, names, use_ema=use_ema, source=source)
            unexpected = ckpt.unexpected_official(state, names)
            ckpt.check_schedule(state, model.schedule.alphas_cumprod, source)
        ckpt.match_state_dict(state, {sources[k]: shapes[k] for k in shapes}, source)
        if unexpected:
            warnings.warn(f"{source}: ignoring {len(unexpected)} unexpected tensors: {ckpt.describe(unexpected)}",
                          stacklevel=3)
        model.load_state_dict({k: _runnable(state[sources[k]]) for k in shapes}, assign=True)
        return model.eval()

    def save_pretrained(self, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (rdm_fast's format) atomically; returns the weights path.
        ``dtype``: the precision stored, torch.float32, torch.float16 or torch.bfloat16 (None: the model's own;
        ValueError for any other, or if a weight is beyond its range). ValueError for a ``directory`` that names
        a file or holds another command's output (see :func:`rdm_fast.checkpoint.save_safetensors`)."""
        tensors = ckpt.cast_floats(self.state_dict(), dtype)
        return ckpt.save_safetensors(tensors, self.config.to_dict(), directory)

    def official_names(self) -> dict[str, str]:
        """Our state-dict names -> the names in official checkpoints."""
        names = {f"unet.{k}": ckpt.UNET_PREFIX + v for k, v in self.unet.official_names().items()}
        names.update({f"first_stage.{k}": ckpt.FIRST_STAGE_PREFIX + v
                      for k, v in official_names(self.first_stage).items()})
        return names

    def official_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in the official checkpoint layout (no EMA copy)."""
        state = self.state_dict()
        return {off: state[ours] for ours, off in self.official_names().items()}

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Where the model's weights live (the UNet's)."""
        return self.unet.input_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's weight precision (the first stage runs in it too)."""
        return self.unet.input_conv.weight.dtype

    def _check_precision(self, what: str) -> None:
        """ValueError for weights in a precision the kernels do not run (float64, after ``.double()``: a kernel's
        "unsupported dtype" error named no cause)."""
        if self.dtype not in RUN_DTYPES:
            raise ValueError(f"{what}: the model's weights are {self.dtype}, but it runs in float32, float16 or "
                             "bfloat16: convert it with .float(), .half() or .to(torch.bfloat16)")

    # ------------------------------------------------------------------ autoencoder
    def encode(self, images: Tensor, *, sample: bool = True,
               generator: Generators = None,
               noise: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents ``scale_factor * z`` (fp32).

        KL models draw a posterior sample (``sample=False``: its mean), as the reference does in training, with
        ``generator`` (one, or one per image as in :meth:`sample`) or from ``noise`` (standard normal draws of
        the unscaled latent's shape); not both."""
        return self.latents(self.encode_moments(images), sample=sample, generator=generator, noise=noise)

    @on_own_device
    def encode_moments(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the first stage's deterministic output (fp32): the KL posterior's
        (mean, log-variance), or the VQ pre-quantisation latent. :meth:`latents` turns it into latents."""
        self._check_precision("encode")
        dd = self.config.first_stage_config.ddconfig
        f = dd.downsample_factor
        _check_tensor(images, "encode: images", f"(B, {dd.in_channels}, H, W)", self.device)
        if (images.dim() != 4 or images.shape[1] != dd.in_channels or images.shape[2] % f or images.shape[3] % f
                or not images.shape[2] or not images.shape[3]):
            raise ValueError(f"encode: images must be (B, {dd.in_channels}, H, W) with H, W positive multiples of {f}, "
                             f"got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"encode: images must be floats in [-1, 1], got {images.dtype} (uint8 pixels: "
                             "x / 127.5 - 1)")
        if images.shape[0] < 1:
            raise ValueError("encode: images hold no samples (batch of 0)")
        check_image_range(images, "encode", "the first stage")
        refresh_cached(self.first_stage.encoder)  # weights may have been written through .data since the last call
        moments = self.first_stage.moments(self._first_stage_input(images.to(self.device, self.dtype)))
        return moments.float().contiguous()

    def latents(self, moments: Tensor, *, sample: bool = True,
                generator: Generators = None,
                noise: Tensor | None = None) -> Tensor:
        """Scaled latents (fp32) from :meth:`encode_moments`' output (see :meth:`encode`). TypeError unless
        ``moments`` (and ``noise``, if given) are tensors; ValueError for moments of another shape or, on the CPU,
        holding NaN or infinity."""
        kl = self.config.first_stage_config.kind == "kl"
        channels = self.config.channels * (2 if kl else 1)  # KL: (mean, log-variance) along the channels
        _check_tensor(moments, "latents: moments", f"(B, {channels}, h, w)", self.device)
        if moments.dim() != 4 or moments.shape[1] != channels or not moments.shape[0]:
            raise ValueError(f"latents: moments must be (B, {channels}, h, w) as encode_moments returns them, got "
                             f"{tuple(moments.shape)}")
        if not moments.is_floating_point():
            raise ValueError(f"latents: moments must be floats, got {moments.dtype}")
        _check_finite_on_cpu(moments, "latents: moments")
        if noise is not None:
            _check_tensor(noise, "encode: noise", f"(B, {self.config.channels}, h, w)", self.device)
            if not noise.is_floating_point():  # bools and ints were taken as draws
                raise ValueError(f"encode: noise must hold floats (standard normal draws), got {noise.dtype}")
            _check_finite_on_cpu(noise, "encode: noise")
        if noise is not None and generator is not None:
            raise ValueError("encode: give noise or generator, not both")
        if sample and noise is None and kl:
            b, c, h, w = moments.shape
            noise = draw_noise((b, c // 2, h, w), generator, moments.device)
        return self.first_stage.latent(moments.float(), sample=sample, noise=noise) * self.config.scale_factor

    @on_own_device
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> images in [-1, 1] (fp32). VQ models snap to the codebook first.
        TypeError unless ``z`` is a tensor, ValueError for a batch of 0 (as :meth:`sample`)."""
        self._check_precision("decode")
        _check_tensor(z, "decode: latents", f"(B, {self.config.channels}, h, w)", self.device)
        if z.dim() != 4 or z.shape[1] != self.config.channels or not z.shape[2] or not z.shape[3]:
            raise ValueError(f"decode: latents must be (B, {self.config.channels}, h, w) with h, w >= 1, got "
                             f"{tuple(z.shape)}")
        if z.shape[0] < 1:
            raise ValueError("decode: latents hold no samples (batch of 0)")
        if not z.is_floating_point():
            raise ValueError(f"decode: latents must be floats, got {z.dtype}")
        _check_finite_on_cpu(z, "decode: latents")  # one NaN made the whole image NaN, written as black
        z = z.to(self.device, torch.float32).div(self.config.scale_factor).to(self.dtype)
        refresh_cached(self.first_stage.decoder)  # weights may have been written through .data since the last call
        return self.first_stage.decode(self._first_stage_input(z)).float().clamp(-1.0, 1.0).contiguous()

    def _first_stage_input(self, x: Tensor) -> Tensor:
        """``x`` for the first stage. On CUDA its weights are converted once to the channels-last layout and ``x``
        is laid out so too: NHWC convolutions (cuDNN runs NCHW ones through layout transforms), the Triton
        GroupNorm's tile kernels, attention tokens as views of the maps. Results leave in NCHW memory."""
        if self.device.type != "cuda":
            return x
        if self.first_stage.decoder.conv_in.weight.is_contiguous():  # not converted yet (3x3: formats differ)
            to_channels_last(self.first_stage)
        return x.contiguous(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ sampling
    def check_context(self, context: Tensor) -> None:
        """TypeError unless ``context`` is a tensor, ValueError unless it is (B >= 1, k >= 1, context_dim) floats,
        finite where it is on the CPU (device tensors are not read: no host synchronisation)."""
        d = self.config.context_dim
        _check_tensor(context, "context", f"(B, k, {d})", self.device)
        if context.dim() != 3:
            raise ValueError(f"context must be (B, k, {d}): B samples, k embeddings each; got {tuple(context.shape)}")
        if context.shape[-1] != d:
            raise ValueError(f"context embeddings have {context.shape[-1]} dimensions but this model expects {d} "
                             "(context_dim): use embeddings from the model's retrieval encoder")
        if context.shape[1] < 1:
            raise ValueError("context must hold at least one embedding per sample")
        if context.shape[0] < 1:
            raise ValueError("context holds no samples (batch of 0)")
        if not context.is_floating_point():
            raise ValueError(f"context must hold floats, got {context.dtype}")
        _check_finite_on_cpu(context, "context")
        if context.device.type == "cpu" and context.numel() and \
                float(context.double().square().sum(-1).max()) > NORM_LIMIT ** 2:
            raise ValueError(f"context embeddings have norms beyond {NORM_LIMIT:.3g}, more than the model computes "
                             "with in float32")

    @torch.no_grad()
    @on_own_device
    def sample(self, context: Tensor, steps: int | None = None, sampler: Literal["ddim", "plms"] | None = None,
               eta: float | None = None, guidance_scale: float | None = None, x_T: Tensor | None = None,
               generator: Generators = None,
               size: tuple[int, int] | None = None, progress: bool = False,
               cuda_graph: bool | None = None, channels_last: bool | None = None) -> Tensor:
        """Draw latents (B, C, H, W), fp32, from noise conditioned on ``context`` (B, k, D).

        ``context``: the embeddings laid out as the model was trained (``rdm_fast.retrieval.model_context`` builds
        them from a database); L2-normalised here where the config says ``normalized_embeddings``, as the command
        line does; a length the model's conventions do not allow is warned about. ``steps``, ``sampler``, ``eta``
        and ``guidance_scale`` default to the config's ``sampling`` section. As in the reference, DDIM's
        timesteps are every T // steps from t = 1, so few steps start mid-schedule (steps=2: t = 501, 1);
        ``steps`` runs from 1 to T // 2 (an integer: int, NumPy integers), and a count whose last uniform timestep
        would pass T - 1 is refused (ValueError naming the nearest counts that fit; see
        :meth:`Schedule.ddim_timesteps`). ``context`` and ``x_T`` must be tensors (TypeError otherwise); CPU ones
        holding NaN or infinity are refused (ValueError; device tensors are not read, sampling stays free of host
        synchronisation).
        ``eta``: DDIM noise, 0 (deterministic) up to a bound >= 1 that depends on the schedule and ``steps``
        (ValueError beyond it, see :meth:`Schedule.ddim`). Classifier-free guidance with ``guidance_scale != 1``
        contrasts against an all-zero context. ``x_T`` fixes the starting noise; otherwise it is drawn from
        ``generator``, which also draws the noise of ``eta > 0``: one generator, or a sequence of one per sample
        (each sample's draws then do not depend on the batch it is in), torch or NumPy ones (NumPy's take seeds of
        any size: the command line's per-sample streams; torch's CPU generator keeps 32 bits of its seed).
        ``size`` (H, W) overrides the configured latent size (multiples of the UNet's downsampling factor).
        ``cuda_graph`` (default: on CUDA for float16/bfloat16 models) replays each guided UNet call from a CUDA
        graph captured once for the trajectory's shapes and kept for the next call with the same shapes, guidance
        and weights (a new batch's context is copied into it: no new capture per batch); float32 models run eagerly
        unless it is True (an 8-step float32 trajectory replayed from graphs differed from the eager one on an
        H200, cause open: ``bench/RESULTS.md``). The kept graph holds its activation memory until the next capture or
        :meth:`release_cuda_graph`.
        ``channels_last`` (default: on CUDA) converts the UNet's weights once to the channels-last layout, in
        which convolutions use NHWC kernels and the tokens of each spatial transformer are views of the feature
        maps (no layout copies).
        """
        self._check_precision("sample")
        self.check_context(context)
        run = self.config.sampling.resolve(steps, sampler, eta, guidance_scale)
        if size is not None:
            if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(
                    isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in size)):
                raise ValueError(f"size must be (H, W), two positive ints, got {size!r}")
            size = (int(size[0]), int(size[1]))  # NumPy integers too
        check_generator(generator, context.shape[0])  # now: with x_T, the noise of eta > 0 is drawn after a step
        problem = self.config.context_length_problem(context.shape[1])
        if problem and context.shape[1] not in self._warned_lengths:  # once per length, not once per batch
            self._warned_lengths.add(context.shape[1])
            log.warning("the context holds %d embeddings per sample; %s", context.shape[1], problem)
        if self.config.normalized_embeddings:
            context = F.normalize(context.float(), dim=-1)
        wants_nhwc = channels_last if channels_last is not None else self.device.type == "cuda"
        if wants_nhwc and self.unet.input_conv.weight.is_contiguous():  # not converted yet (3x3: formats differ)
            to_channels_last(self.unet)
        refresh_cached(self.unet)  # weights may have been written through .data since the last call
        context = context.to(self.device)
        b = context.shape[0]
        h, w = size or (self.config.image_size, self.config.image_size)
        shape = (b, self.config.channels, h, w)
        if x_T is None:
            x = draw_noise(shape, generator, self.device)
        else:
            _check_tensor(x_T, "x_T", str(shape), self.device)
            if not x_T.is_floating_point():  # as encode's noise: ints and bools are no draws
                raise ValueError(f"x_T must hold floats (standard normal draws), got {x_T.dtype}")
            _check_finite_on_cpu(x_T, "x_T")
            if tuple(x_T.shape) != shape:
                raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
            x = x_T.to(self.device, torch.float32)
        coeffs = self.schedule.ddim(run.steps, run.eta)
        eps_fn = guided(self.unet, context, run.guidance_scale, prepare=self.unet.prepare_context)
        cuda_graph = self._graph_default(cuda_graph)
        # the graph bakes in the weights' storage and the tensors cached from them: any change means a new capture
        weights = (cache_updates(), *((p.data_ptr(), None if p.is_inference() else p._version)
                                      for p in self.unet.parameters()))
        key = (float(run.guidance_scale), tuple(context.shape), ops.get_mode(), weights)  # the mode picks the kernels
        eps_fn = self._graphs(eps_fn, x, cuda_graph, key)
        if run.sampler == "ddim":
            return sample_ddim(eps_fn, x, coeffs, generator=generator, progress=progress)
        return sample_plms(eps_fn, x, coeffs, progress=progress)

    def _graph_default(self, cuda_graph: bool | None) -> bool | None:
        """``cuda_graph`` as given, except that None means False for a float32 model on CUDA (graph replay of float32
        trajectories is not verified yet), which is logged once per model, not at every batch."""
        if cuda_graph is not None or self.device.type != "cuda" or self.dtype != torch.float32:
            return cuda_graph
        if not self._said_float32_eager:
            self._said_float32_eager = True
            log.info("float32 sampling on CUDA runs eagerly by default (cuda_graph=True replays CUDA graphs, "
                     "not yet verified for float32 trajectories)")
        return False

    def release_cuda_graph(self) -> None:
        """Free the CUDA graph :meth:`sample` keeps for a following batch of the same shapes (and its memory)."""
        self._graphs.clear()

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.unet.parameters())
        return f"unet_params={n:,}, latent={self.config.latent_shape}, context_dim={self.config.context_dim}"


def _is_own_layout(state: dict[str, Any]) -> bool:
    return any(k.startswith("unet.") for k in state)


def _with_train_weights(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], str]:
    """``state`` (an rdm_fast file) with the UNet's raw training weights from the train_weights.safetensors beside
    it, and the source to name in errors; without that file, ``state`` unchanged and a warning."""
    raw_path = path.parent / ckpt.TRAIN_WEIGHTS_FILE
    if not raw_path.is_file():
        warnings.warn(f"use_ema=False / --no-ema: {path} holds one set of UNet weights (the EMA ones if it was made "
                      f"from a checkpoint that had them) and no {ckpt.TRAIN_WEIGHTS_FILE} beside it: using them",
                      stacklevel=3)
        return state, str(path)
    raw, _ = ckpt.read_state_dict(raw_path)
    names = {f"unet.{k}" for k in raw}
    expected = {k for k in state if k.startswith("unet.")}
    if names != expected:  # another run's file, or a damaged one: the config is not what is wrong
        differ = [f"{what} {len(keys)}: {ckpt.describe(keys, 3)}" for what, keys in
                  (("missing", sorted(expected - names)), ("unexpected", sorted(names - expected))) if keys]
        raise ckpt.CheckpointError(
            f"{raw_path} does not hold the UNet tensors of {path.name} beside it ({'; '.join(differ)}): is it from "
            "another run, or damaged? without use_ema=False (CLI: --no-ema) the EMA weights load")
    log.info("%s: using the UNet's training weights from %s, not the EMA ones", path, raw_path.name)
    merged = {k: v for k, v in state.items() if not k.startswith("unet.")}
    merged.update({f"unet.{k}": v for k, v in raw.items()})
    return merged, f"{path} with {raw_path.name}"


def checkpoint_config(path: str | Path, config: str | Path | dict | RDMConfig | None = None) -> RDMConfig | None:
    """The config :meth:`RDM.from_pretrained` would use, where it is known without reading any tensors (the given
    one, an rdm_fast file's own, or an official checkpoint's config.yaml beside it); None where only the tensors
    tell, or where ``path`` is no checkpoint (loading it says why). Lets callers check settings before loading."""
    if config is not None:
        return RDMConfig.resolve(config)
    try:
        path = ckpt.resolve_file(path)
    except ckpt.CheckpointError:
        return None
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":  # as from_pretrained tells its own files: metadata or tensor names
        metadata, names = ckpt.read_metadata(path), ckpt.read_names(path)
        if metadata.get("format") == ckpt.FORMAT_NAME or _is_own_layout(dict.fromkeys(names)):
            own = ckpt.read_own_config(metadata, path)
            return None if own is None else RDMConfig.from_dict(own)
    return _config_beside(path)


def config_file_beside(path: Path) -> Path | None:
    """The config.yaml (or NAME.yaml) beside an official checkpoint file, if any."""
    return next((c for c in (path.with_suffix(".yaml"), path.parent / "config.yaml") if c.is_file()), None)


def _config_beside(path: Path) -> RDMConfig | None:
    """An official checkpoint's config from the file beside it, if any."""
    candidate = config_file_beside(path)
    if candidate is None:
        return None
    log.info("%s: using the config %s", path, candidate)
    return RDMConfig.from_yaml(candidate)


def _config_for_official(state: dict[str, Any], path: Path) -> RDMConfig:
    """The config of an official checkpoint: config.yaml beside it, else the preset its tensors match."""
    beside = _config_beside(path)
    if beside is not None:
        return beside
    for name in preset_names():
        cfg = RDMConfig.preset(name)
        with torch.device("meta"):
            model = RDM(cfg)
        shapes = {k: tuple(v.shape) for k, v in model.official_state_dict().items()}
        if all(k in state and tuple(state[k].shape) == s for k, s in shapes.items()):
            log.info("%s: tensors match the %r preset", path, name)
            return cfg
    raise ckpt.CheckpointError(f"cannot tell which model {path} holds (no config.yaml beside it and no preset "
                               f"matches its tensors): pass config= (--config on the command line) a preset "
                               f"({', '.join(preset_names())}) or the model's config.yaml")


__all__ = ["RDM", "ConfigError", "checkpoint_config"]

"""Model configuration as dataclasses whose fields carry the official YAML names.

An official ``config.yaml`` (the released ``model.params`` tree of latent-diffusion / RDM) loads directly:
``RDMConfig.from_yaml(path)``. rdm_fast's own presets (``rdm_fast/configs/*.yaml``) use the same layout, so
there is one parser. Fields the reference code uses only for training bookkeeping are accepted and ignored;
fields that would change the architecture to something the released models never use raise a clear error.
The retrieval conventions and sampling defaults rdm_fast adds (``k_nn``, ``text_token``,
``normalized_embeddings``, ``retrieval_encoder``, ``sampling``) are missing from the official files: those a
file lacks (and the settings a partial ``sampling`` section lacks) come from the preset of the same architecture
(logged), else keep their defaults (with a warning). An unknown key that closely matches a field of its section
is taken for a typo of it (ConfigError); other unknown keys are ignored with a warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal

import yaml

from ._files import not_a_file

PRESETS_DIR = Path(__file__).parent / "configs"
# rdm_fast's own model.params fields (retrieval conventions, sampling defaults), absent from official configs
OWN_FIELDS = ("k_nn", "text_token", "normalized_embeddings", "retrieval_encoder", "sampling")
# conditioning keys of the released RDMs; both build the same UNet, whose cross-attention context is the
# retrieved embeddings ("retro_only": the neighbours alone, no further conditioning; the ImageNet/FFHQ models)
CONDITIONING_KEYS = ("crossattn", "retro_only")

log = logging.getLogger(__name__)
_STEPS_WARNED: set[tuple[int, int]] = set()  # (sampling.steps, timesteps) pairs already warned about


class ConfigError(ValueError):
    """A configuration that rdm_fast cannot build."""


def _checked_value(name: str, value: Any, annotation: str) -> Any:
    """``value`` if it has the field's simple type (int, float, bool, str, tuple[int, ...], optionally None; a
    float written as a string, as YAML reads ``1e-4``, is converted); ConfigError naming the field otherwise.
    Other annotations (nested configs, Literal) are left to the classes' own checks."""
    allowed = [t.strip() for t in annotation.split("|")]
    if value is None and "None" in allowed:
        return value
    for t in allowed:
        if t == "float" and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                continue
        if t in ("int", "float", "bool", "str"):
            kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}[t]
            if isinstance(value, kinds) and (t == "bool" or not isinstance(value, bool)):
                return float(value) if t == "float" else value
        elif t == "tuple[int, ...]":
            if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
                return value
        elif t != "None":
            return value
    raise ConfigError(f"{name} = {value!r} must be {annotation}")


def _take(cls: type, params: dict[str, Any], where: str, *, ignored: set[str],
          fixed: dict[str, Any]) -> dict[str, Any]:
    """Split ``params`` into the dataclass fields of ``cls``; check fixed-value and unknown keys."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    unknown = []
    for key, value in params.items():
        if key in types:
            out[key] = _checked_value(f"{where}.{key}", value, str(types[key]))
        elif key in fixed:
            if value != fixed[key]:
                raise ConfigError(f"{where}.{key} = {value!r} is not supported (the released RDMs use "
                                  f"{fixed[key]!r})")
        elif key not in ignored:
            unknown.append(key)
    for key in unknown:
        typo_of = difflib.get_close_matches(str(key), [*types, *fixed], n=1, cutoff=0.8)
        if typo_of:
            raise ConfigError(f"{where}: unknown key {key!r}; did you mean {typo_of[0]}?")
    if unknown:
        warnings.warn(f"{where}: ignoring unknown keys {sorted(unknown)}", stacklevel=3)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in out and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where} is missing required keys {missing}")
    return out


def _tuple(v: Any) -> tuple[int, ...]:
    return tuple(int(i) for i in v) if v is not None else ()


def _require(where: str, rules: Iterable[tuple[str, Any, bool, str]]) -> None:
    """ConfigError ``<where>.<field> = <value> <requirement>`` for the first ``(field, value, ok, requirement)``
    rule that is not ok."""
    for name, value, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"{where}.{name} = {list(value) if isinstance(value, tuple) else value!r} {requirement}")


def _positive(obj: Any, *names: str) -> list[tuple[str, Any, bool, str]]:
    """Rules that the int fields ``names`` of ``obj`` are at least 1."""
    return [(n, getattr(obj, n), getattr(obj, n) >= 1, "must be at least 1") for n in names]


# the group count of every GroupNorm in the UNet and the autoencoders: each layer's width is a multiple of the base
# width (model_channels, ch), which the input convolution feeds to the first GroupNorm, so the base must divide
_GROUPS = 32
_GROUPED = f"must be a positive multiple of {_GROUPS} (the GroupNorm groups)"
_MULTS = "must be a non-empty list of positive ints"


@dataclass(frozen=True)
class UNetConfig:
    """``unet_config.params`` of the LDM UNet with spatial transformers."""

    in_channels: int
    out_channels: int
    model_channels: int
    attention_resolutions: tuple[int, ...]
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    context_dim: int
    image_size: int = 64
    num_heads: int = -1
    num_head_channels: int = -1
    transformer_depth: int = 1
    legacy: bool = True
    dropout: float = 0.0

    _IGNORED = {"use_checkpoint", "use_fp16", "num_heads_upsample"}
    _FIXED = {"dims": 2, "use_spatial_transformer": True, "use_scale_shift_norm": False,
              "resblock_updown": False, "num_classes": None, "use_linear_in_transformer": False,
              "use_new_attention_order": False, "conv_resample": True, "n_embed": None}

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_resolutions", _tuple(self.attention_resolutions))
        object.__setattr__(self, "channel_mult", _tuple(self.channel_mult))
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ConfigError("unet_config: set num_heads or num_head_channels")
        mc, mults, factors = self.model_channels, self.channel_mult, self.level_factors
        # the transformers' widths: the levels listed in attention_resolutions and the middle block (last level)
        attended = sorted({mc * m for m, f in zip(mults, factors) if f in self.attention_resolutions} |
                          {mc * m for m in mults[-1:]})
        head_field = "num_heads" if self.num_head_channels == -1 else "num_head_channels"  # see heads(); -1: unset
        n = getattr(self, head_field)
        _require("unet_config.params", [
            ("model_channels", mc, mc > 0 and mc % _GROUPS == 0, _GROUPED),
            ("channel_mult", mults, bool(mults) and min(mults) > 0, _MULTS),
            *_positive(self, "in_channels", "out_channels", "num_res_blocks", "transformer_depth", "context_dim"),
            ("attention_resolutions", self.attention_resolutions, set(self.attention_resolutions) <= set(factors),
             f"must hold downsampling factors of the UNet's levels (one per channel_mult entry): {factors}"),
            (head_field, n, n > 0 and all(w % n == 0 for w in attended),
             f"must be a positive divisor of the widths of the levels with a transformer: {attended}"),
        ])

    @property
    def level_factors(self) -> list[int]:
        """The downsampling factor of each level (1, 2, 4, ...): what ``attention_resolutions`` lists."""
        return [2 ** i for i in range(len(self.channel_mult))]

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head dim) of a transformer at ``channels``, following the reference rules."""
        if self.num_head_channels == -1:
            heads = self.num_heads
            dim_head = channels // heads
        else:
            heads = channels // self.num_head_channels
            dim_head = self.num_head_channels
        if self.legacy:
            dim_head = channels // heads
        return heads, dim_head

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "UNetConfig":
        return cls(**_take(cls, params, "unet_config.params", ignored=cls._IGNORED, fixed=cls._FIXED))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_resolutions"] = list(self.attention_resolutions)
        d["channel_mult"] = list(self.channel_mult)
        d["use_spatial_transformer"] = True
        return d


@dataclass(frozen=True)
class DDConfig:
    """``ddconfig`` of the first-stage encoder/decoder pair."""

    z_channels: int
    resolution: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    double_z: bool = True
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", _tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", _tuple(self.attn_resolutions))
        f = self.downsample_factor
        _require("ddconfig", [
            ("ch", self.ch, self.ch > 0 and self.ch % _GROUPS == 0, _GROUPED),
            ("ch_mult", self.ch_mult, bool(self.ch_mult) and min(self.ch_mult) > 0, _MULTS),
            *_positive(self, "z_channels", "num_res_blocks", "in_channels", "out_ch"),
            ("resolution", self.resolution, self.resolution > 0 and self.resolution % f == 0,
             f"must be a positive multiple of 2 ** (len(ch_mult) - 1) = {f}"),
        ])

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "DDConfig":
        return cls(**_take(cls, params, "ddconfig", ignored={"give_pre_end", "tanh_out"}, fixed={}))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d


def _sampling_problem(steps: int, sampler: str, eta: float, guidance_scale: float) -> str | None:
    """What is wrong with a set of sampling settings, phrased after the setting ("eta must be ..."), or None."""
    for name, value in (("eta", eta), ("guidance_scale", guidance_scale)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{name} must be a real number, got {value!r}"
    if steps < 1:
        return f"steps must be at least 1, got {steps}"
    if sampler not in ("ddim", "plms"):
        return f"sampler must be 'ddim' or 'plms', got {sampler!r}"
    if not (math.isfinite(eta) and eta >= 0):
        return f"eta must be finite and >= 0, got {eta}"
    if sampler == "plms" and eta != 0:
        return f"eta must be 0 for plms, which is deterministic; got {eta}"
    if not math.isfinite(guidance_scale):
        return f"guidance_scale must be finite, got {guidance_scale}"
    return None


@dataclass(frozen=True)
class SamplingDefaults:
    """rdm_fast's own ``sampling`` section: what ``python -m rdm_fast.sample`` uses unless told otherwise."""

    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise ConfigError(f"sampling.steps must be an int, got {self.steps!r}")
        problem = _sampling_problem(self.steps, self.sampler, self.eta, self.guidance_scale)
        if problem:
            raise ConfigError(f"sampling.{problem}")

    def resolve(self, steps: int | None = None, sampler: str | None = None, eta: float | None = None,
                guidance_scale: float | None = None) -> "SamplingDefaults":
        """The settings of one sampling run: these defaults where an argument is None, checked together
        (ValueError or TypeError naming the argument; ``Schedule.ddim`` checks ``steps`` and ``eta`` against the
        schedule)."""
        steps = self.steps if steps is None else steps
        sampler = self.sampler if sampler is None else sampler
        eta = self.eta if eta is None else eta
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(f"steps must be an int, got {steps!r}")
        steps = int(steps)
        problem = _sampling_problem(steps, sampler, eta, guidance_scale)
        if problem:
            raise (TypeError if "must be a real number" in problem else ValueError)(problem)
        return SamplingDefaults(steps, sampler, eta, guidance_scale)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "SamplingDefaults":
        return cls(**_take(cls, params, "model.params.sampling", ignored=set(), fixed={}))


MAX_TEXT_NEIGHBORS = 20  # rdm768's contexts: a text (or query) embedding and up to 20 neighbours

# The learning-rate schedule of the released training configs (model.params.scheduler_config): LDM's
# LambdaLinearScheduler with one cycle that never ends, the rate's factor rising linearly from WARM_UP_START to 1
# over warm_up_steps (100 for imagenet, 10000 for ffhq), then constant.
WARM_UP_SCHEDULER = "ldm.lr_scheduler.LambdaLinearScheduler"
WARM_UP_START = 1e-6
_ENDLESS_CYCLE = 10000000000000


def _warm_up_steps(tree: Any) -> int:
    """The ``warm_up_steps`` of a ``scheduler_config`` of the released form (see ``WARM_UP_SCHEDULER``); 0, with
    a warning, for other schedules, which training does not reproduce."""
    params = tree.get("params") if isinstance(tree, dict) else None
    if isinstance(params, dict) and str(tree.get("target", "")).endswith("LambdaLinearScheduler"):
        one = {k: v[0] for k, v in params.items() if isinstance(v, (list, tuple)) and len(v) == 1}
        steps = one.get("warm_up_steps")
        if (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0 and one.get("f_max") == 1
                and one.get("f_min") == 1 and one.get("f_start", WARM_UP_START) == WARM_UP_START):
            return steps
    log.warning("model.params.scheduler_config is not a linear warm-up from %g to a constant rate (%s, one cycle, "
                "f_max = f_min = 1): training does not reproduce it and warms up only with --warmup",
                WARM_UP_START, WARM_UP_SCHEDULER)
    return 0


KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
VQ_TARGET = "ldm.models.autoencoder.VQModelInterface"


@dataclass(frozen=True)
class AutoencoderConfig:
    """``first_stage_config``: a KL (continuous) or VQ (codebook) autoencoder."""

    kind: Literal["kl", "vq"]
    embed_dim: int
    ddconfig: DDConfig
    n_embed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("kl", "vq"):
            raise ConfigError(f"first_stage_config: unknown autoencoder kind {self.kind!r}")
        if self.kind == "vq" and (self.n_embed or 0) < 1:
            raise ConfigError(f"first_stage_config: a VQ autoencoder needs n_embed (codebook size) >= 1, got "
                              f"{self.n_embed!r}")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "AutoencoderConfig":
        target = str(cfg.get("target", ""))
        if "VQ" in target:
            kind = "vq"
        elif "KL" in target:
            kind = "kl"
        else:
            raise ConfigError(f"first_stage_config.target {target!r}: expected an AutoencoderKL or a VQ model")
        params = dict(cfg.get("params", {}))
        if "ddconfig" not in params:
            raise ConfigError("first_stage_config.params is missing ddconfig")
        params["ddconfig"] = DDConfig.from_dict(params["ddconfig"])
        params["kind"] = kind
        return cls(**_take(cls, params, "first_stage_config.params", fixed={},
                           ignored={"lossconfig", "monitor", "ckpt_path", "ignore_keys", "image_key",
                                    "colorize_nlabels", "remap", "sane_index_shape", "batch_resize_range"}))

    def to_dict(self) -> dict[str, Any]:
        params: dict[str, Any] = {"embed_dim": self.embed_dim, "ddconfig": self.ddconfig.to_dict()}
        if self.n_embed:
            params["n_embed"] = self.n_embed
        return {"target": VQ_TARGET if self.kind == "vq" else KL_TARGET, "params": params}


@dataclass(frozen=True)
class RDMConfig:
    """``model.params`` of a released RDM: diffusion schedule, UNet, first stage, retrieval conventions.

    Retrieval conventions: ``k_nn`` database entries per sample; with ``text_token`` (rdm768) a text or query
    embedding precedes them (context of 1 + k_nn tokens), without it (imagenet: k_nn = 4) the query is the
    first of the k_nn entries. ``normalized_embeddings``: whether the UNet sees L2-normalised embeddings.
    ``retrieval_encoder``: the registered encoder (rdm_fast.encoders) whose embeddings the model was trained on;
    databases made by another encoder are refused at sampling time (None: not checked).
    ``k_nn`` and ``normalized_embeddings`` carry the names of the official RDM configs; ``text_token`` and
    ``retrieval_encoder`` are ours. ``warm_up_steps``: the learning-rate warm-up of the released training
    configs, read from and written as their ``scheduler_config`` (training's default ``--warmup``).
    """

    unet_config: UNetConfig
    first_stage_config: AutoencoderConfig
    linear_start: float
    linear_end: float
    timesteps: int = 1000
    beta_schedule: str = "linear"
    parameterization: str = "eps"
    scale_factor: float = 1.0
    image_size: int = 64
    channels: int = 3
    k_nn: int = 4
    text_token: bool = False
    normalized_embeddings: bool = False
    retrieval_encoder: str | None = None
    sampling: SamplingDefaults = SamplingDefaults()
    warm_up_steps: int = 0

    _IGNORED = {"first_stage_key", "cond_stage_key", "log_every_t", "num_timesteps_cond", "cond_stage_trainable",
                "monitor", "scale_by_std", "use_ema", "cond_stage_config", "loss_type", "ckpt_path",
                "ignore_keys", "load_only_unet", "learn_logvar", "logvar_init", "l_simple_weight",
                "original_elbo_weight", "v_posterior", "clip_denoised", "use_positional_encodings",
                "cosine_s", "given_betas", "query_key", "retrieval_encoder_cfg",
                "nn_encoder_cfg", "query_encoder_cfg", "nn_key", "retro_noise", "retrieval_cfg",
                "retro_conditioning_key", "learn_nn_encoder", "nn_memory", "n_patches_per_side",
                "resize_patch_size", "searcher_path", "retro_concat", "p_uncond", "guidance_vex_shape",
                "aggregate", "k_nn_max_noise", "public_retrieval_cfg", "concat_mode", "cond_stage_forward",
                "unet_trainable"}

    def __post_init__(self) -> None:
        if self.beta_schedule != "linear":
            raise ConfigError(f"beta_schedule {self.beta_schedule!r}: the released RDMs use 'linear'")
        if self.parameterization != "eps":
            raise ConfigError(f"parameterization {self.parameterization!r}: the released RDMs predict 'eps'")
        if self.unet_config.in_channels != self.channels:
            raise ConfigError(f"channels = {self.channels} but unet_config.in_channels = "
                              f"{self.unet_config.in_channels}")
        if self.first_stage_config.embed_dim != self.channels:
            raise ConfigError(f"channels = {self.channels} but first_stage_config.embed_dim = "
                              f"{self.first_stage_config.embed_dim}")
        if self.unet_config.out_channels != self.channels:
            raise ConfigError(f"channels = {self.channels} but unet_config.out_channels = "
                              f"{self.unet_config.out_channels} (the UNet predicts eps of the latent's shape)")
        start, size, f = self.linear_start, self.image_size, self.unet_config.level_factors[-1]
        _require("model.params", [
            ("timesteps", self.timesteps, self.timesteps >= 2, "must be at least 2"),
            ("linear_start", start, 0 < start < 1, "must be in (0, 1)"),
            ("linear_end", self.linear_end, start < self.linear_end < 1,
             f"must be in (linear_start, 1) = ({start}, 1)"),
            ("image_size", size, size > 0 and size % f == 0,
             f"must be a positive multiple of the UNet's downsampling factor {f} (2 ** (len(channel_mult) - 1))"),
            *_positive(self, "k_nn"),
            ("warm_up_steps", self.warm_up_steps, self.warm_up_steps >= 0, "must be at least 0"),
            ("scale_factor", self.scale_factor, math.isfinite(self.scale_factor) and self.scale_factor > 0,
             "must be positive and finite"),
        ])
        # A default step count the schedule refuses fails every sampling run that relies on it: said at load, as a
        # warning (the config still trains, and samples with other steps). Imported here: the diffusion package
        # imports the ops, which import this module.
        from .diffusion.schedule import uniform_timesteps

        try:
            uniform_timesteps(self.sampling.steps, self.timesteps)
        except ValueError as e:
            if (self.sampling.steps, self.timesteps) not in _STEPS_WARNED:
                _STEPS_WARNED.add((self.sampling.steps, self.timesteps))
                log.warning("sampling.%s: this config's default step count cannot sample; give steps= (--steps)", e)

    @property
    def context_dim(self) -> int:
        """Width of the context embeddings the UNet cross-attends to (the retrieval encoder's)."""
        return self.unet_config.context_dim

    def context_length_problem(self, tokens: int) -> str | None:
        """How a context of ``tokens`` embeddings per sample departs from this model's conventions (None where it
        does not): exactly k_nn without a text token (the query and its neighbours); with one (rdm768), the text
        alone or it and up to 20 neighbours."""
        if self.text_token and tokens > 1 + MAX_TEXT_NEIGHBORS:
            return (f"this model takes a text or query embedding and up to {MAX_TEXT_NEIGHBORS} neighbours (its "
                    f"config's default: {self.k_nn})")
        if not self.text_token and tokens != self.k_nn:
            return f"this model takes {self.k_nn} (the query and {self.k_nn - 1} neighbours)"
        return None

    @property
    def context_tokens(self) -> int:
        """Embeddings per sample in the context this model was trained with."""
        return self.k_nn + int(self.text_token)

    @property
    def pixel_size(self) -> int:
        """The side of the images the first stage encodes to a latent of ``image_size`` (256 for imagenet/ffhq,
        768 for rdm768)."""
        return self.image_size * self.first_stage_config.ddconfig.downsample_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents the UNet denoises at the configured size."""
        return (self.channels, self.image_size, self.image_size)

    @classmethod
    def from_dict(cls, tree: dict[str, Any]) -> "RDMConfig":
        """Build from a ``model.params`` dict, or a whole config file tree with a top-level ``model`` key.

        rdm_fast's own fields (``OWN_FIELDS``) that the tree lacks, as official configs do, and the settings a
        partial ``sampling`` section lacks (``sampling.<name>``) come from the preset of the same architecture;
        without one they keep their defaults and a warning names them."""
        if not isinstance(tree, dict):  # a list failed with an AttributeError
            raise TypeError(f"RDMConfig.from_dict: expected a dict (a config tree), got {type(tree).__name__}")
        cfg, missing = cls._parse(tree)
        if not missing:
            return cfg
        name = _matching_preset(cfg)
        if name is None:
            log.warning("model.params lacks %s and matches no preset's architecture (%s): using the defaults "
                        "%s", ", ".join(missing), ", ".join(preset_names()),
                        ", ".join(f"{f}={attrgetter(f)(cfg)!r}" for f in missing))
            return cfg
        preset = _read_preset(name)
        log.info("model.params lacks %s: taken from the %r preset (same architecture)", ", ".join(missing), name)
        taken = {f: attrgetter(f)(preset) for f in missing}
        settings = {f.removeprefix("sampling."): taken.pop(f) for f in list(taken) if f.startswith("sampling.")}
        if settings:  # a partial sampling section, completed with the preset's settings
            taken["sampling"] = dataclasses.replace(cfg.sampling, **settings)
        return dataclasses.replace(cfg, **taken)

    @classmethod
    def _parse(cls, tree: dict[str, Any]) -> "tuple[RDMConfig, list[str]]":
        """The config exactly as the tree gives it (defaults where it is silent), and the ``OWN_FIELDS`` and
        ``sampling.<name>`` settings the tree lacks."""
        top = list(tree)
        if "model" in tree and isinstance(tree["model"], dict):
            tree = tree["model"]
        params = dict(tree.get("params", tree))
        if "unet_config" not in params and "first_stage_config" not in params:
            raise ConfigError(f"not an RDM config: no model.params with unet_config and first_stage_config (its "
                              f"top-level keys: {', '.join(map(str, top)) or 'none'})")
        for key in ("unet_config", "first_stage_config"):
            if key not in params:
                raise ConfigError(f"model.params is missing {key}")
        key = params.pop("conditioning_key", "crossattn")
        if key not in CONDITIONING_KEYS:
            raise ConfigError(f"model.params.conditioning_key = {key!r} is not supported: rdm_fast builds the "
                              "released RDMs' UNet, which takes the retrieved embeddings as cross-attention "
                              f"context ({' or '.join(map(repr, CONDITIONING_KEYS))})")
        unet_cfg = params["unet_config"]
        params["unet_config"] = UNetConfig.from_dict(dict(unet_cfg.get("params", unet_cfg)))
        params["first_stage_config"] = AutoencoderConfig.from_dict(params["first_stage_config"])
        missing = [f for f in OWN_FIELDS if f not in params]
        if "scheduler_config" in params:
            params["warm_up_steps"] = _warm_up_steps(params.pop("scheduler_config"))
        if "sampling" in params:
            given = dict(params["sampling"] or {})
            # completed with the defaults for now (ddim with eta 0 suit any given eta or sampler); from_dict
            # replaces the missing settings, checked again, where a preset matches
            params["sampling"] = SamplingDefaults.from_dict(given)
            missing += [f"sampling.{f.name}" for f in dataclasses.fields(SamplingDefaults) if f.name not in given]
        return cls(**_take(cls, params, "model.params", ignored=cls._IGNORED, fixed={})), missing

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RDMConfig":
        """An official ``config.yaml`` (or a ``model.params``-only one); ConfigError naming the file if invalid."""
        tree = _read_yaml(path)
        try:
            return cls.from_dict(tree)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def preset(cls, name: str) -> "RDMConfig":
        """A shipped config by name (see :func:`preset_names`)."""
        if name not in preset_names():
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
        return cls.from_yaml(PRESETS_DIR / f"{name}.yaml")

    @classmethod
    def resolve(cls, config: "str | Path | dict | RDMConfig") -> "RDMConfig":
        """Accept a preset name, a YAML path, a ``model.params`` dict or an RDMConfig."""
        if isinstance(config, RDMConfig):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        text = str(config)
        if text in preset_names():
            return cls.preset(text)
        if text.endswith((".yaml", ".yml")) or Path(text).is_file():
            return cls.from_yaml(text)
        raise ConfigError(f"config {text!r} is neither a preset ({', '.join(preset_names())}) nor a YAML file")

    def to_dict(self) -> dict[str, Any]:
        """The official-layout tree: ``{"model": {"target": ..., "params": {...}}}``."""
        params: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                  if f.name not in ("unet_config", "first_stage_config", "sampling", "warm_up_steps")}
        params["sampling"] = dataclasses.asdict(self.sampling)
        if self.warm_up_steps:
            params["scheduler_config"] = {"target": WARM_UP_SCHEDULER, "params": {
                "warm_up_steps": [self.warm_up_steps], "cycle_lengths": [_ENDLESS_CYCLE], "f_start": [WARM_UP_START],
                "f_max": [1.0], "f_min": [1.0]}}
        params["conditioning_key"] = "crossattn"
        params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                 "params": self.unet_config.to_dict()}
        params["first_stage_config"] = self.first_stage_config.to_dict()
        return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def preset_names() -> list[str]:
    """Names of the shipped configs (``RDMConfig.preset(name)``, ``--config name``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} {not_a_file(path)}")
    try:
        tree = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (YAML) file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} does not hold a config mapping")
    return tree


def _read_preset(name: str) -> RDMConfig:
    """A preset as written (no filling in: presets set every field)."""
    return RDMConfig._parse(_read_yaml(PRESETS_DIR / f"{name}.yaml"))[0]


def _architecture(cfg: RDMConfig) -> tuple:
    """What fixes the network's tensors and computation: UNet layout and heads, first stage, latent channels."""
    u = cfg.unet_config
    widths = [u.model_channels * m for m in u.channel_mult]
    return (cfg.channels, u.in_channels, u.out_channels, u.model_channels, u.channel_mult, u.num_res_blocks,
            tuple(sorted(u.attention_resolutions)), u.context_dim, u.transformer_depth,
            tuple(u.heads(w) for w in widths), cfg.first_stage_config)


def _matching_preset(cfg: RDMConfig) -> str | None:
    """The preset whose architecture equals ``cfg``'s (the released model a config file describes), or None."""
    arch = _architecture(cfg)
    return next((name for name in preset_names() if _architecture(_read_preset(name)) == arch), None)


__all__ = ["RDMConfig", "UNetConfig", "AutoencoderConfig", "DDConfig", "SamplingDefaults", "ConfigError",
           "preset_names"]

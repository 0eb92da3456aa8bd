"""Configs: presets, official config.yaml trees, and clear errors for what rdm_fast cannot build."""

from __future__ import annotations

import re
import warnings
from dataclasses import replace

import pytest
import yaml

from rdm_fast import RDMConfig
from rdm_fast.config import PRESETS_DIR, ConfigError, SamplingDefaults, UNetConfig, preset_names

# An official-style config.yaml: the model.params tree plus the training bookkeeping the reference carries.
OFFICIAL_768 = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.015
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: jpg
    cond_stage_key: nix
    image_size: 48
    channels: 16
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_by_std: false
    scale_factor: 0.22765929
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 48
        in_channels: 16
        out_channels: 16
        model_channels: 448
        attention_resolutions: [4, 2, 1]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 4]
        use_scale_shift_norm: false
        resblock_updown: false
        num_head_channels: 32
        use_spatial_transformer: true
        context_dim: 768
        use_checkpoint: true
        legacy: false
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 16
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 16
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 1, 2, 2, 4]
          num_res_blocks: 2
          attn_resolutions: [16]
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: torch.nn.Identity
data:
  target: main.DataModuleFromConfig
"""


def test_presets_exist():
    assert preset_names() == ["ffhq", "imagenet", "rdm768", "tiny"]


@pytest.mark.parametrize("name", ["ffhq", "imagenet", "rdm768", "tiny"])
def test_preset_round_trip(name):
    cfg = RDMConfig.preset(name)
    assert RDMConfig.from_dict(cfg.to_dict()) == cfg
    assert RDMConfig.resolve(name) == cfg
    # the tree convert --to official writes as config.yaml: the reference's UNetModel builds no transformers (and
    # refuses a context_dim) unless told use_spatial_transformer, which rdm_fast's parser takes for granted
    assert cfg.to_dict()["model"]["params"]["unet_config"]["params"]["use_spatial_transformer"] is True


def test_official_yaml_loads_directly(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(OFFICIAL_768)
    cfg = RDMConfig.from_yaml(path)
    preset = RDMConfig.preset("rdm768")
    assert cfg.unet_config.model_channels == 448 and cfg.unet_config.legacy is False
    assert cfg.first_stage_config == preset.first_stage_config
    assert (cfg.linear_end, cfg.scale_factor, cfg.image_size, cfg.channels) == (0.015, 0.22765929, 48, 16)
    # legacy only changes the head width rule; with num_head_channels it is the same architecture
    assert cfg.unet_config.heads(1792) == preset.unet_config.heads(1792) == (56, 32)
    assert RDMConfig.resolve(str(path)) == cfg
    # the params tree alone works too
    assert RDMConfig.from_dict(yaml.safe_load(OFFICIAL_768)["model"]["params"]) == cfg


def test_head_rules():
    base = dict(in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[1], num_res_blocks=1,
                channel_mult=[1], context_dim=8)
    assert UNetConfig(**base, num_head_channels=32).heads(192) == (6, 32)
    assert UNetConfig(**base, num_heads=8).heads(192) == (8, 24)
    assert UNetConfig(**base, num_heads=8, num_head_channels=16, legacy=False).heads(192) == (12, 16)
    with pytest.raises(ConfigError, match="num_heads or num_head_channels"):
        UNetConfig(**base)


def edited(base: str = OFFICIAL_768, **changes) -> dict:
    """The config tree of ``base`` with ``changes``: ``a__b=v`` sets model.params.a.b (through the ``params`` of
    unet_config and first_stage_config)."""
    tree = yaml.safe_load(base)
    for dotted, value in changes.items():
        node = tree["model"]["params"]
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]["params"] if key in ("unet_config", "first_stage_config") else node[key]
        node[last] = value
    return tree


@pytest.mark.parametrize("change,message", [
    (dict(unet_config__use_scale_shift_norm=True), "use_scale_shift_norm = True is not supported"),
    (dict(conditioning_key="concat"), "conditioning_key = 'concat' is not supported"),
    (dict(parameterization="x0"), "parameterization 'x0'"),
    (dict(beta_schedule="cosine"), "beta_schedule 'cosine'"),
    (dict(channels=4), "channels = 4 but unet_config.in_channels = 16"),
    (dict(unet_config__model_channels=100), r"model_channels = 100 must be a positive multiple of 32 \(the GroupNorm"),
    (dict(image_size="16"), r"model.params.image_size = '16' must be int"),
    (dict(unet_config__context_dim=768.5), r"unet_config.params.context_dim = 768.5 must be int"),
    (dict(text_token="yes"), r"model.params.text_token = 'yes' must be bool"),
    (dict(timesteps=0), "model.params.timesteps = 0 must be at least 2"),
    (dict(linear_end=2.0), r"model.params.linear_end = 2.0 must be in \(linear_start, 1\)"),
    (dict(scale_factor=0), "model.params.scale_factor = 0.0 must be positive"),
    (dict(k_nn=0), "model.params.k_nn = 0 must be at least 1"),
    (dict(unet_config__out_channels=3), "channels = 16 but unet_config.out_channels = 3"),
    (dict(sampling={"sampler": "euler"}), "sampling.sampler must be 'ddim' or 'plms'"),
    (dict(sampling={"eta": 5, "sampler": "plms"}), r"sampling.eta must be 0 for plms"),
    (dict(sampling={"eta": -1.0}), r"sampling.eta must be finite and >= 0"),
    (dict(sampling={"steps": "fifty"}), "sampling.steps = 'fifty' must be int"),
    # YAML's true/yes is no count (k_nn = True made a context of 2 tokens), nor is a fraction a channel multiple
    # (channel_mult [1, 2, 3, 4.5] was truncated to [1, 2, 3, 4], another network than the file's)
    (dict(k_nn=True), "model.params.k_nn = True must be int"),
    (dict(unet_config__channel_mult=[1, 2, 3, 4.5]),
     re.escape("unet_config.params.channel_mult = [1, 2, 3, 4.5] must be tuple[int, ...]")),
    (dict(unet_config__attention_resolutions=[4, 2, True]),
     re.escape("unet_config.params.attention_resolutions = [4, 2, True] must be tuple[int, ...]")),
    # the latent the first stage makes is the one the UNet denoises
    (dict(first_stage_config__embed_dim=8), "channels = 16 but first_stage_config.embed_dim = 8"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        RDMConfig.from_dict(edited(**change))


def test_a_default_step_count_the_schedule_refuses_is_warned_about_at_load(caplog, monkeypatch):
    """Every sampling run relying on it failed; the config still loads (it trains, and samples with other steps),
    with one warning per count and schedule length."""
    from rdm_fast import config as config_module

    monkeypatch.setattr(config_module, "_STEPS_WARNED", set())
    for steps, problem in ((3, "sampling.steps = 3 would visit timestep 1000, past the last one"),
                           (10000, "sampling.steps must be between 1 and 500 for a 1000-step schedule")):
        caplog.clear()
        for _ in range(2):
            assert RDMConfig.from_dict(edited(sampling={"steps": steps})).sampling.steps == steps
        warned = [r.getMessage() for r in caplog.records if "cannot sample" in r.getMessage()]
        assert len(warned) == 1 and warned[0].startswith(problem), warned
    caplog.clear()
    RDMConfig.from_dict(edited(sampling={"steps": 50}))
    assert not [r for r in caplog.records if "cannot sample" in r.getMessage()]
    with pytest.raises(ConfigError, match="sampling.steps must be an int, got 2.5"):
        SamplingDefaults(steps=2.5)


def test_sampling_settings_resolve_against_the_defaults():
    """``SamplingDefaults.resolve``: None takes the config's value; the result is checked as a whole (the PLMS/eta
    pair included), with errors naming the argument rather than the config field."""
    defaults = RDMConfig.resolve("imagenet").sampling
    assert defaults.resolve() == defaults
    assert defaults.resolve(steps=7, guidance_scale=1.0) == replace(defaults, steps=7, guidance_scale=1.0)
    assert defaults.resolve(sampler="plms").sampler == "plms"  # imagenet's default eta is 0
    with pytest.raises(ValueError, match="^eta must be 0 for plms"):
        defaults.resolve(sampler="plms", eta=0.5)
    with pytest.raises(ValueError, match="^sampler must be 'ddim' or 'plms'"):
        defaults.resolve(sampler="euler")
    with pytest.raises(ValueError, match="^guidance_scale must be finite"):
        defaults.resolve(guidance_scale=float("inf"))
    with pytest.raises(ValueError, match="^steps must be at least 1"):
        defaults.resolve(steps=0)
    with pytest.raises(TypeError, match="^steps must be an int"):
        defaults.resolve(steps=True)
    # an explicit 0 is a setting, not "unset": eta 0 (deterministic DDIM) under a default eta of 1, guidance 0 (the
    # unconditional prediction alone) under a default of 2
    other = SamplingDefaults(steps=10, eta=1.0, guidance_scale=2.0)
    assert (other.resolve(eta=0.0).eta, other.resolve(guidance_scale=0.0).guidance_scale) == (0.0, 0.0)


def test_floats_written_as_yaml_strings_are_read():
    """YAML 1.1 reads an exponent without a dot (1e-2) as a string; float fields take it as the number."""
    assert RDMConfig.from_dict(edited(linear_end="1e-2", scale_factor=1)).linear_end == 0.01


def test_missing_and_unknown_keys():
    tree = yaml.safe_load(OFFICIAL_768)
    del tree["model"]["params"]["unet_config"]["params"]["context_dim"]
    with pytest.raises(ConfigError, match=r"unet_config.params is missing required keys \['context_dim'\]"):
        RDMConfig.from_dict(tree)
    with pytest.raises(ConfigError, match="missing unet_config"):
        RDMConfig.from_dict({"model": {"params": {"first_stage_config": {}}}})
    with pytest.raises(ConfigError, match=r"not an RDM config: no model.params .* \(its top-level keys: model\)"):
        RDMConfig.from_dict({"model": {"params": {"linear_start": 0.1}}})
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['new_feature'\]"):
        RDMConfig.from_dict(edited(new_feature=1))
    tree = edited()
    tree["model"]["params"]["first_stage_config"]["target"] = "some.OtherModel"
    with pytest.raises(ConfigError, match="expected an AutoencoderKL or a VQ model"):
        RDMConfig.from_dict(tree)


def test_bad_files_and_names(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RDMConfig.from_yaml(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RDMConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="does not hold a config mapping"):
        RDMConfig.from_yaml(tmp_path / "list.yaml")
    (tmp_path / "other.yaml").write_text("foo: bar\n")
    with pytest.raises(ConfigError, match=r"other.yaml: not an RDM config: .*\(its top-level keys: foo\)"):
        RDMConfig.from_yaml(tmp_path / "other.yaml")
    (tmp_path / "ctx.npy").write_bytes(b"\x93NUMPY\x01\x00" + bytes(range(128, 256)))
    with pytest.raises(ConfigError, match="config file .*ctx.npy is not a text"):
        RDMConfig.from_yaml(tmp_path / "ctx.npy")
    with pytest.raises(ConfigError, match="unknown preset 'huge'; presets: ffhq, imagenet, rdm768, tiny"):
        RDMConfig.preset("huge")
    with pytest.raises(ConfigError, match="neither a preset"):
        RDMConfig.resolve("huge")


def test_conventions_of_the_released_families():
    imagenet, rdm768 = RDMConfig.preset("imagenet"), RDMConfig.preset("rdm768")
    assert (imagenet.context_tokens, imagenet.normalized_embeddings, imagenet.context_dim) == (4, False, 512)
    assert (rdm768.context_tokens, rdm768.normalized_embeddings, rdm768.context_dim) == (11, True, 768)
    assert (imagenet.sampling.steps, imagenet.sampling.guidance_scale) == (100, 2.0)
    assert (rdm768.sampling.steps, rdm768.sampling.guidance_scale) == (50, 5.0)
    assert imagenet.first_stage_config.kind == "vq" and rdm768.first_stage_config.kind == "kl"


# The official ImageNet RDM config (CompVis retrieval-augmented-diffusion-models, models/rdm/imagenet): the
# reference's own model class, conditioning_key retro_only, and none of rdm_fast's sampling/retrieval fields.
OFFICIAL_IMAGENET = """
model:
  base_learning_rate: 0.0001
  target: rdm.models.diffusion.ddpm.MinimalRETRODiffusion
  params:
    k_nn: 4
    query_key: clip_img_emb
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: nixda
    image_size: 64
    channels: 3
    cond_stage_trainable: false
    nn_key: nn_embeddings
    nn_memory: nn_memory/oi_imagenet.p
    conditioning_key: retro_only
    monitor: val/loss_simple_ema
    scale_by_std: false
    ignore_keys: ['unconditional_guidance_vex']
    scheduler_config:
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [100]
        cycle_lengths: [10000000000000]
        f_start: [1.0e-06]
        f_max: [1.0]
        f_min: [1.0]
    unet_config:
      target: rdm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 3
        out_channels: 3
        model_channels: 192
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 5]
        use_scale_shift_norm: false
        resblock_updown: false
        num_head_channels: 32
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 512
        use_checkpoint: true
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
        ddconfig: {double_z: false, z_channels: 3, resolution: 256, in_channels: 3, out_ch: 3, ch: 128,
                   ch_mult: [1, 2, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}
        lossconfig: {target: torch.nn.Identity}
    retrieval_encoder_cfg: {target: torch.nn.Identity}
    cond_stage_config: __is_unconditional__
"""


def test_official_imagenet_config_with_retro_only(tmp_path, caplog):
    """retro_only (the neighbours alone as cross-attention context) is the released ImageNet model's key; the
    fields rdm_fast adds come from the imagenet preset, which the file's architecture matches."""
    path = tmp_path / "config.yaml"
    path.write_text(OFFICIAL_IMAGENET)
    with caplog.at_level("INFO", logger="rdm_fast.config"):
        cfg = RDMConfig.from_yaml(path)
    assert cfg == RDMConfig.preset("imagenet")
    assert (cfg.k_nn, cfg.text_token, cfg.normalized_embeddings, cfg.retrieval_encoder) == (4, False, False,
                                                                                           "clip-vit-b-32")
    assert (cfg.sampling.steps, cfg.sampling.guidance_scale) == (100, 2.0)
    assert "lacks text_token, normalized_embeddings, retrieval_encoder, sampling: taken from the 'imagenet'" \
        in caplog.text


def test_the_released_warm_up_is_read_and_written_as_scheduler_config(caplog):
    """The released training configs' learning-rate warm-up (imagenet 100 steps, ffhq 10000) is the config's
    warm_up_steps, written back in the official form; schedules training does not reproduce load with a warning
    and no warm-up, and the config without one has none."""
    tree = yaml.safe_load(OFFICIAL_IMAGENET)
    assert RDMConfig.from_dict(tree).warm_up_steps == 100
    assert (RDMConfig.preset("ffhq").warm_up_steps, RDMConfig.preset("rdm768").warm_up_steps) == (10000, 0)
    written = RDMConfig.preset("imagenet").to_dict()["model"]["params"]["scheduler_config"]
    assert written == tree["model"]["params"]["scheduler_config"]
    assert "scheduler_config" not in RDMConfig.preset("rdm768").to_dict()["model"]["params"]
    for change in ({"target": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler"}, {"params": {"f_min": [0.1]}},
                   {"params": {"warm_up_steps": [100, 100]}}, {"params": {"f_start": [0.5]}},
                   {"params": {"f_max": [0.5]}}):
        other = yaml.safe_load(OFFICIAL_IMAGENET)
        sched = other["model"]["params"]["scheduler_config"]
        sched["target"] = change.get("target", sched["target"])
        sched["params"].update(change.get("params", {}))
        caplog.clear()
        with caplog.at_level("WARNING", logger="rdm_fast.config"):
            assert RDMConfig.from_dict(other).warm_up_steps == 0
        assert "scheduler_config is not a linear warm-up from 1e-06 to a constant rate" in caplog.text, change
    with pytest.raises(ConfigError, match="warm_up_steps = -1 must be at least 0"):
        replace(RDMConfig.preset("tiny"), warm_up_steps=-1)


def test_official_768_config_takes_the_rdm768_conventions(caplog):
    with caplog.at_level("INFO", logger="rdm_fast.config"):
        cfg = RDMConfig.from_dict(yaml.safe_load(OFFICIAL_768))
    preset = RDMConfig.preset("rdm768")
    assert (cfg.k_nn, cfg.text_token, cfg.normalized_embeddings, cfg.retrieval_encoder) == (10, True, True,
                                                                                           "clip-vit-l-14")
    assert cfg.sampling == preset.sampling and cfg.sampling.guidance_scale == 5.0
    assert "taken from the 'rdm768' preset" in caplog.text
    # a field the file sets is kept
    assert RDMConfig.from_dict(edited(k_nn=20)).k_nn == 20


def test_own_fields_without_a_matching_preset_keep_defaults(caplog):
    with caplog.at_level("INFO", logger="rdm_fast.config"):
        cfg = RDMConfig.from_dict(edited(unet_config__model_channels=256))
    assert (cfg.k_nn, cfg.text_token, cfg.normalized_embeddings, cfg.retrieval_encoder) == (4, False, False, None)
    warning = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "lacks k_nn, text_token, normalized_embeddings, retrieval_encoder, sampling" \
        in warning[0].getMessage()
    # the imagenet UNet on another first stage (a 16384-code VQ) is no released model either: its latents differ
    caplog.clear()
    with caplog.at_level("INFO", logger="rdm_fast.config"):
        cfg = RDMConfig.from_dict(edited(OFFICIAL_IMAGENET, first_stage_config__n_embed=16384))
    assert (cfg.retrieval_encoder, cfg.sampling) == (None, SamplingDefaults())
    assert "matches no preset's architecture" in caplog.text


def test_unsupported_conditioning_key_message():
    with pytest.raises(ConfigError, match=r"conditioning_key = 'hybrid' is not supported: .*cross-attention "
                                          r"context \('crossattn' or 'retro_only'\)"):
        RDMConfig.from_dict(edited(conditioning_key="hybrid"))


TINY = (PRESETS_DIR / "tiny.yaml").read_text()


@pytest.mark.parametrize("change,where,typo,field", [
    (dict(scalefactor=0.5), "model.params", "scalefactor", "scale_factor"),
    (dict(sampling={"steps": 20, "guidence_scale": 2.0}), "model.params.sampling", "guidence_scale",
     "guidance_scale"),
    (dict(k_nnn=4), "model.params", "k_nnn", "k_nn"),
    (dict(unet_config__num_head_channel=32), "unet_config.params", "num_head_channel", "num_head_channels"),
    (dict(unet_config__use_scale_shift_nrom=True), "unet_config.params", "use_scale_shift_nrom",
     "use_scale_shift_norm"),  # a fixed-value key: its check must not be skipped either
    (dict(first_stage_config__ddconfig__z_channel=16), "ddconfig", "z_channel", "z_channels"),
    (dict(first_stage_config__embed_dims=16), "first_stage_config.params", "embed_dims", "embed_dim"),
])
def test_near_miss_keys_are_typos(change, where, typo, field):
    """An unknown key close to a field of its section would leave that field at its default: an error."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)}: unknown key '{typo}'; did you mean {field}\?$"):
        RDMConfig.from_dict(edited(**change))


def test_typos_in_a_config_file(tmp_path):
    """The audit's cases on the tiny preset's file: a default (scale_factor 1.0, guidance 1.0) instead of the
    file's value, with only a warning."""
    path = tmp_path / "tiny.yaml"
    for right, wrong, field in [("scale_factor: 0.5", "scalefactor: 0.5", "scale_factor"),
                                ("guidance_scale: 2.0", "guidence_scale: 2.0", "guidance_scale")]:
        assert TINY.count(right) == 1
        path.write_text(TINY.replace(right, wrong))
        with pytest.raises(ConfigError, match=rf"tiny.yaml: .*unknown key '{wrong[:-5]}'; did you mean {field}\?"):
            RDMConfig.from_yaml(path)


def test_official_configs_load_without_warnings():
    """Their keys rdm_fast does not model (training bookkeeping, retrieval settings) are known and ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for text in (OFFICIAL_768, OFFICIAL_IMAGENET):
            RDMConfig.from_dict(yaml.safe_load(text))
        for name in preset_names():
            RDMConfig.preset(name)


def test_partial_sampling_section_is_completed_from_the_preset(caplog):
    """Settings a partial ``sampling`` section leaves out come from where a missing section comes from: the preset
    of the same architecture (imagenet's guidance 2.0, not the dataclass's 1.0), else the defaults (warned)."""
    tree = yaml.safe_load(OFFICIAL_IMAGENET)
    tree["model"]["params"]["sampling"] = {"steps": 10}
    with caplog.at_level("INFO", logger="rdm_fast.config"):
        cfg = RDMConfig.from_dict(tree)
    assert cfg.sampling == replace(RDMConfig.preset("imagenet").sampling, steps=10)
    assert cfg.sampling.guidance_scale == 2.0
    assert "lacks text_token, normalized_embeddings, retrieval_encoder, sampling.sampler, sampling.eta, " \
           "sampling.guidance_scale: taken from the 'imagenet' preset" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="rdm_fast.config"):
        cfg = RDMConfig.from_dict(edited(unet_config__model_channels=256, sampling={"steps": 10}))
    assert cfg.sampling == SamplingDefaults(steps=10)
    warning, = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "sampling.sampler='ddim', sampling.eta=0.0, sampling.guidance_scale=1.0" in warning


@pytest.mark.parametrize("resolutions", [[64], [1, 3]])
def test_attention_resolutions_must_name_levels(resolutions):
    """A factor no level has builds no transformer there (the tiny UNet's levels: factors 1 and 2)."""
    with pytest.raises(ConfigError, match=re.escape(
            f"unet_config.params.attention_resolutions = {resolutions} must hold downsampling factors of the "
            "UNet's levels (one per channel_mult entry): [1, 2]")):
        RDMConfig.from_dict(edited(TINY, unet_config__attention_resolutions=resolutions))


@pytest.mark.parametrize("change,field", [
    (dict(unet_config__model_channels=0), "unet_config.params.model_channels = 0"),
    (dict(unet_config__model_channels=-32), "unet_config.params.model_channels = -32"),
    # 96 and 192 channels suit the GroupNorm, but the input conv's 48 do not
    (dict(unet_config__model_channels=48, unet_config__channel_mult=[2, 4]), "unet_config.params.model_channels = 48"),
    (dict(unet_config__channel_mult=[1, 0]), "unet_config.params.channel_mult = [1, 0]"),
    (dict(unet_config__channel_mult=[1, -2]), "unet_config.params.channel_mult = [1, -2]"),
    (dict(unet_config__channel_mult=[]), "unet_config.params.channel_mult = []"),
    (dict(unet_config__num_res_blocks=0), "unet_config.params.num_res_blocks = 0"),
    (dict(unet_config__num_res_blocks=-1), "unet_config.params.num_res_blocks = -1"),
    (dict(unet_config__num_head_channels=0), "unet_config.params.num_head_channels = 0"),
    (dict(unet_config__num_head_channels=2048), "unet_config.params.num_head_channels = 2048"),
    (dict(unet_config__num_head_channels=24), "unet_config.params.num_head_channels = 24"),  # 448 % 24 != 0
    (dict(unet_config__num_head_channels=-1, unet_config__num_heads=0), "unet_config.params.num_heads = 0"),
    (dict(unet_config__num_head_channels=-1, unet_config__num_heads=5), "unet_config.params.num_heads = 5"),
    # the middle block's transformer at the last level (1344 channels) needs it too, listed there or not
    (dict(unet_config__channel_mult=[2, 2, 2, 3], unet_config__attention_resolutions=[1],
          unet_config__num_head_channels=128), "unet_config.params.num_head_channels = 128"),
    (dict(unet_config__transformer_depth=0), "unet_config.params.transformer_depth = 0"),
    (dict(unet_config__transformer_depth=-1), "unet_config.params.transformer_depth = -1"),
    (dict(unet_config__context_dim=0), "unet_config.params.context_dim = 0"),
    (dict(unet_config__context_dim=-768), "unet_config.params.context_dim = -768"),
    (dict(first_stage_config__ddconfig__ch=0), "ddconfig.ch = 0"),
    (dict(first_stage_config__ddconfig__ch=48), "ddconfig.ch = 48"),  # GroupNorm(32) of 48 channels
    (dict(first_stage_config__ddconfig__z_channels=0), "ddconfig.z_channels = 0"),
    (dict(first_stage_config__ddconfig__ch_mult=[]), "ddconfig.ch_mult = []"),
    (dict(first_stage_config__ddconfig__resolution=200), "ddconfig.resolution = 200"),  # f16: 2 ** 4
    (dict(first_stage_config__ddconfig__num_res_blocks=0), "ddconfig.num_res_blocks = 0"),
    (dict(linear_start=0.015), "model.params.linear_end = 0.015"),  # linear_start == linear_end
    (dict(linear_start=0.02), "model.params.linear_end = 0.015"),
    (dict(linear_start=-0.1), "model.params.linear_start = -0.1"),
    (dict(timesteps=1), "model.params.timesteps = 1"),
    (dict(timesteps=-5), "model.params.timesteps = -5"),
    (dict(image_size=44, unet_config__image_size=44), "model.params.image_size = 44"),  # 4 levels: multiples of 8
])
def test_invalid_sizes_are_config_errors(change, field):
    """Sizes that would crash inside torch (or build a degenerate model) are one-line errors naming the field and
    its value."""
    with pytest.raises(ConfigError, match=f"^{re.escape(field)} must ") as e:
        RDMConfig.from_dict(edited(**change))
    assert "\n" not in str(e.value)


def test_vq_codebook_size_must_be_positive():
    with pytest.raises(ConfigError, match=r"needs n_embed \(codebook size\) >= 1, got -5"):
        RDMConfig.from_dict(edited(OFFICIAL_IMAGENET, first_stage_config__n_embed=-5))


@pytest.mark.parametrize("change", [
    dict(unet_config__num_head_channels=-1, unet_config__num_heads=8),  # -1: heads by count instead
    dict(unet_config__num_heads=-1),  # the default: unset
    dict(unet_config__attention_resolutions=[]),  # cross-attention in the middle block only
    dict(unet_config__attention_resolutions=[8, 1]),
    dict(first_stage_config__ddconfig__resolution=768),
])
def test_legal_sizes_still_load(change):
    RDMConfig.from_dict(edited(**change))


def test_settings_an_official_config_leaves_out_take_ldms_defaults():
    """A config.yaml without timesteps or scale_factor means LatentDiffusion's defaults, 1000 and 1.0 (the schedule
    and latent scale every checkpoint of it was trained with)."""
    tree = yaml.safe_load(OFFICIAL_768)
    for key in ("timesteps", "scale_factor"):
        del tree["model"]["params"][key]
    cfg = RDMConfig.from_dict(tree)
    assert (cfg.timesteps, cfg.scale_factor) == (1000, 1.0)


# The released models as the reference describes them (RDM_FACTS.md: the families' table, the UNet's heads of 32
# channels, the FFHQ model "as the ImageNet model with mc 224, mult 1,2,3,4, same otherwise"): the presets are
# what official checkpoints load with, where no config.yaml comes with them, and whose conventions official
# configs take. The key lists check only the tensors' shapes, so a wrong schedule, latent scale, retrieval
# convention or sampling default passed every test.
_IMAGENET_FACTS = dict(linear_start=0.0015, linear_end=0.0195, timesteps=1000, scale_factor=1.0, image_size=64,
                       channels=3, pixel_size=256, kind="vq", n_embed=8192, context_dim=512, k_nn=4,
                       text_token=False, normalized_embeddings=False, retrieval_encoder="clip-vit-b-32",
                       sampling=SamplingDefaults(steps=100, sampler="ddim", eta=0.0, guidance_scale=2.0),
                       model_channels=192, channel_mult=(1, 2, 3, 5), attention_resolutions=(2, 4, 8))
RELEASED = {
    "imagenet": _IMAGENET_FACTS,
    "ffhq": {**_IMAGENET_FACTS, "model_channels": 224, "channel_mult": (1, 2, 3, 4)},
    "rdm768": dict(linear_start=0.0015, linear_end=0.015, timesteps=1000, scale_factor=0.22765929, image_size=48,
                   channels=16, pixel_size=768, kind="kl", n_embed=None, context_dim=768, k_nn=10, text_token=True,
                   normalized_embeddings=True, retrieval_encoder="clip-vit-l-14",
                   sampling=SamplingDefaults(steps=50, sampler="ddim", eta=0.0, guidance_scale=5.0),
                   model_channels=448, channel_mult=(1, 2, 3, 4), attention_resolutions=(1, 2, 4)),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_are_the_released_models(name):
    cfg = RDMConfig.preset(name)
    u, first = cfg.unet_config, cfg.first_stage_config
    got = dict(linear_start=cfg.linear_start, linear_end=cfg.linear_end, timesteps=cfg.timesteps,
               scale_factor=cfg.scale_factor, image_size=cfg.image_size, channels=cfg.channels,
               pixel_size=cfg.pixel_size, kind=first.kind, n_embed=first.n_embed, context_dim=cfg.context_dim,
               k_nn=cfg.k_nn, text_token=cfg.text_token, normalized_embeddings=cfg.normalized_embeddings,
               retrieval_encoder=cfg.retrieval_encoder, sampling=cfg.sampling, model_channels=u.model_channels,
               channel_mult=u.channel_mult, attention_resolutions=tuple(sorted(u.attention_resolutions)))
    assert got == RELEASED[name]
    assert (cfg.beta_schedule, cfg.parameterization) == ("linear", "eps")
    assert all(u.heads(u.model_channels * m) == (u.model_channels * m // 32, 32) for m in u.channel_mult)

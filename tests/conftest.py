"""Shared fixtures: small official-layout checkpoints built by the independent oracle (tests/oracle.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import oracle  # noqa: E402

from rdm_fast import RDMConfig  # noqa: E402


def oracle_shapes(cfg: RDMConfig) -> tuple[dict, dict]:
    """Official UNet and first-stage shape tables (no prefixes) of a config, from the oracle's own derivation."""
    u, f = cfg.unet_config, cfg.first_stage_config
    dd = f.ddconfig
    unet = oracle.unet_shapes(in_channels=u.in_channels, out_channels=u.out_channels,
                              model_channels=u.model_channels, channel_mult=u.channel_mult,
                              num_res_blocks=u.num_res_blocks, attention_resolutions=u.attention_resolutions,
                              context_dim=u.context_dim, num_head_channels=u.num_head_channels,
                              transformer_depth=u.transformer_depth)
    ae = oracle.autoencoder_shapes(f.kind, ch=dd.ch, ch_mult=dd.ch_mult, num_res_blocks=dd.num_res_blocks,
                                   attn_resolutions=dd.attn_resolutions, resolution=dd.resolution,
                                   z_channels=dd.z_channels, embed_dim=f.embed_dim, in_channels=dd.in_channels,
                                   out_ch=dd.out_ch, n_embed=f.n_embed, double_z=dd.double_z)
    return unet, ae


def official_checkpoint(cfg: RDMConfig, seed: int = 0) -> tuple[dict, dict, dict]:
    """(full official state dict with prefixes, UNet part, first-stage part), random well-conditioned weights."""
    unet_shapes, ae_shapes = oracle_shapes(cfg)
    unet = oracle.random_state_dict(unet_shapes, seed)
    ae = oracle.random_state_dict(ae_shapes, seed + 1)
    full = {"model.diffusion_model." + k: v for k, v in unet.items()}
    full.update({"first_stage_model." + k: v for k, v in ae.items()})
    return full, unet, ae


def mini_vq_config() -> RDMConfig:
    """A small model of the imagenet family: VQ first stage, 3-level UNet with attention only below full
    resolution, 3 heads of 32 channels, no text token."""
    tree = RDMConfig.preset("tiny").to_dict()
    p = tree["model"]["params"]
    p.update(channels=3, text_token=False, normalized_embeddings=False)
    p["unet_config"]["params"].update(in_channels=3, out_channels=3, channel_mult=[1, 2, 3], num_res_blocks=2,
                                      attention_resolutions=[2, 4], num_head_channels=32, context_dim=48)
    dd = {**p["first_stage_config"]["params"]["ddconfig"], "double_z": False, "z_channels": 3,
          "attn_resolutions": []}
    p["first_stage_config"] = {"target": "ldm.models.autoencoder.VQModelInterface",
                               "params": {"embed_dim": 3, "n_embed": 64, "ddconfig": dd}}
    return RDMConfig.from_dict(tree)


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Isolate the ops dispatch state: mode (env var and override), first-use log lines, fallback warnings."""
    from rdm_fast.ops import _dispatch

    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(_dispatch, "_mode_override", None)
    monkeypatch.setattr(_dispatch, "_logged", set())
    monkeypatch.setattr(_dispatch, "_warned_missing", set())


@pytest.fixture(scope="session")
def tiny_official():
    """(config, official state dict, unet part, first-stage part) for the ``tiny`` preset."""
    cfg = RDMConfig.preset("tiny")
    return (cfg, *official_checkpoint(cfg))

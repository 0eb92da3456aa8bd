"""Official key layout, parameter counts, loading official and own checkpoints, and every way loading can fail."""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import fail_writes_to
from refdata import IMAGENET_TSV, RDM768_TSV, all_keys, section

from rdm_fast import RDM, RDMConfig, checkpoint as ckpt
from rdm_fast.rdm import _config_for_official


def meta_model(preset: str) -> RDM:
    with torch.device("meta"):
        return RDM(RDMConfig.preset(preset))


@pytest.mark.parametrize("preset,tsv,unet_n,ae_n", [("imagenet", IMAGENET_TSV, 400_920_579, 55_322_782),
                                                   ("rdm768", RDM768_TSV, 1_335_480_400, 69_610_963)])
def test_official_names_and_shapes_equal_the_key_lists(preset, tsv, unet_n, ae_n):
    model = meta_model(preset)
    ours = {k: tuple(v.shape) for k, v in model.official_state_dict().items()}
    unet, n_unet, e_unet = section(tsv, "UNet", "")
    first, _, e_first = section(tsv, "first stage", "")
    assert ours == {**unet, **first}
    assert (n_unet, e_unet, e_first) == (688, unet_n, ae_n)
    assert sum(p.numel() for p in model.unet.parameters()) == unet_n
    assert sum(p.numel() for p in model.first_stage.parameters()) == ae_n


def test_parameter_counts():
    counts = {p: sum(t.numel() for t in meta_model(p).unet.parameters()) for p in ("imagenet", "ffhq", "rdm768")}
    assert counts == {"imagenet": 400_920_579, "ffhq": 414_713_603, "rdm768": 1_335_480_400}


def test_ema_names_equal_the_key_list():
    model = meta_model("rdm768")
    ema, n, e = section(RDM768_TSV, "EMA", "")
    names = [ckpt.ema_name(v[len(ckpt.UNET_PREFIX):]) for v in model.official_names().values()
             if v.startswith(ckpt.UNET_PREFIX)]
    assert len(set(names)) == len(names) == 688  # removing the dots creates no collisions
    assert set(names) | {"model_ema.decay", "model_ema.num_updates"} == set(ema)
    assert e == 1_335_480_400 + 2


def meta_state(tsv: Path, preset: str) -> dict[str, torch.Tensor]:
    """A full-size official state dict on the meta device, with the real schedule buffers."""
    model = meta_model(preset)
    state = {k: torch.empty(s, device="meta") for k, s in all_keys(tsv).items()}
    if "alphas_cumprod" in state:
        state["alphas_cumprod"] = model.schedule.alphas_cumprod.float()
    return state


@pytest.mark.parametrize("preset,tsv", [("imagenet", IMAGENET_TSV), ("rdm768", RDM768_TSV)])
def test_full_size_official_layout_loads_without_complaint(preset, tsv):
    state = meta_state(tsv, preset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # schedule buffers, EMA counters and the guidance vector are known
        model = RDM.from_state_dict(state, preset)
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(v.shape) for k, v in state.items()
                                                              if k.startswith(("model.", "first_stage")))
    assert _config_for_official(state, Path("x.ckpt")) == RDMConfig.preset(preset)


def test_ema_weights_are_preferred():
    model = meta_model("rdm768")
    state = meta_state(RDM768_TSV, "rdm768")
    sources = ckpt.official_sources(state, model.official_names())
    unet_sources = [v for k, v in sources.items() if k.startswith("unet.")]
    assert all(v.startswith("model_ema.") and v in state for v in unet_sources)
    assert ckpt.official_sources(state, model.official_names(), use_ema=False) == model.official_names()


def official_file(tmp_path: Path, tiny_official, *, ema: bool = True, extras: bool = True) -> tuple[Path, dict]:
    cfg, full, _, _ = tiny_official
    state = dict(full)
    if ema:  # EMA copies that differ from the raw weights
        for k, v in full.items():
            if k.startswith(ckpt.UNET_PREFIX):
                state[ckpt.ema_name(k[len(ckpt.UNET_PREFIX):])] = v + 0.01
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000)
    if extras:
        state["alphas_cumprod"] = torch.cumprod(1 - torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000) ** 2, 0)
        state["first_stage_model.loss.logvar"] = torch.zeros(())
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000}, path)
    return path, state


def test_official_round_trip(tmp_path, tiny_official):
    """official ckpt -> load (EMA) -> save rdm_fast format -> load: identical tensors and outputs."""
    cfg, full, _, _ = tiny_official
    path, state = official_file(tmp_path, tiny_official)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = RDM.from_pretrained(path, "tiny")
    expected = {k: state[ckpt.ema_name(k[len(ckpt.UNET_PREFIX):])] if k.startswith(ckpt.UNET_PREFIX) else v
                for k, v in full.items()}
    got = model.official_state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    saved = model.save_pretrained(tmp_path / "own")
    assert saved == tmp_path / "own" / "model.safetensors"
    assert json.loads((tmp_path / "own" / "config.json").read_text()) == cfg.to_dict()
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == ["config.json", "model.safetensors"]
    again = RDM.from_pretrained(tmp_path / "own")  # config from the file itself
    assert again.config == cfg
    s1, s2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([3, 900]), torch.randn(2, 4, 64)
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, c), again.unet(x, t, c))
    # the safetensors file alone carries its config
    alone = RDM.from_pretrained(saved)
    assert alone.config == cfg


def test_raw_weights_without_ema(tmp_path, tiny_official):
    _, full, _, _ = tiny_official
    path, _ = official_file(tmp_path, tiny_official)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an official file holds both sets: use_ema=False has nothing to warn about
        model = RDM.from_pretrained(path, "tiny", use_ema=False)
    got = model.official_state_dict()
    assert all(torch.equal(got[k], full[k]) for k in full)


def training_checkpoint(directory: Path) -> tuple[dict, dict]:
    """A checkpoint laid out as ``rdm_fast.train`` writes one: model.safetensors with the EMA UNet and the first
    stage, train_weights.safetensors with the raw UNet, state.json. Returns (EMA UNet state, raw UNet state)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = RDM.from_config("tiny")
    ema = {k: v.clone() for k, v in model.unet.state_dict().items()}
    raw = {k: v + 0.01 if v.is_floating_point() else v for k, v in ema.items()}
    model.save_pretrained(directory)
    save_file(raw, directory / ckpt.TRAIN_WEIGHTS_FILE)
    (directory / ckpt.TRAIN_STATE_FILE).write_text(json.dumps({"step": 7, "ema_updates": 7, "run": {}}))
    return ema, raw


def test_no_ema_loads_a_training_checkpoints_raw_weights(tmp_path):
    ema, raw = training_checkpoint(tmp_path / "ck")
    for use_ema, expected in ((True, ema), (False, raw)):
        got = RDM.from_pretrained(tmp_path / "ck", use_ema=use_ema).unet.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # an rdm_fast file without training weights beside it has one set: a warning, not a silent no-op
    RDM.from_pretrained(tmp_path / "ck").save_pretrained(tmp_path / "plain")
    with pytest.warns(UserWarning, match="holds one set of UNet weights .* no train_weights.safetensors beside it"):
        RDM.from_pretrained(tmp_path / "plain", use_ema=False)
    (tmp_path / "ck" / ckpt.TRAIN_WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="train_weights.safetensors is not a readable safetensors file"):
        RDM.from_pretrained(tmp_path / "ck", use_ema=False)


def test_training_weights_missing_a_tensor_are_refused(tmp_path):
    """use_ema=False takes the UNet wholly from train_weights.safetensors: a tensor missing there (or one too many)
    is named, not filled in from the EMA weights of model.safetensors (merging the raw weights over the whole file
    passed every test: the raw and EMA sets were always complete), and the message blames the file, not the
    config (both files come from one run with one config)."""
    from safetensors.torch import save_file

    _, raw = training_checkpoint(tmp_path / "ck")
    bias = raw.pop("out_conv.bias")
    save_file(raw, tmp_path / "ck" / ckpt.TRAIN_WEIGHTS_FILE)
    with pytest.raises(ckpt.CheckpointError, match=r"train_weights.safetensors does not hold the UNet tensors of "
                                                   r"model.safetensors beside it \(missing 1: unet.out_conv.bias\): "
                                                   r"is it from another run, or damaged\?"):
        RDM.from_pretrained(tmp_path / "ck", use_ema=False)
    raw["out_conv.bias"], raw["extra.weight"] = bias, torch.zeros(2)
    save_file(raw, tmp_path / "ck" / ckpt.TRAIN_WEIGHTS_FILE)
    with pytest.raises(ckpt.CheckpointError, match=r"\(unexpected 1: unet.extra.weight\)"):
        RDM.from_pretrained(tmp_path / "ck", use_ema=False)


def test_a_given_config_is_used_for_an_rdm_fast_file(tmp_path):
    """config= is used for an rdm_fast file too (python -m rdm_fast.sample passes --config on), not only when the
    file carries none: a config of the same shapes with other sampling defaults is the loaded model's. Taking the
    file's own config whenever it has one passed every test."""
    RDM.from_config("tiny").save_pretrained(tmp_path / "m")
    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["sampling"] = {**tree["model"]["params"].get("sampling", {}), "steps": 7}
    assert RDM.from_pretrained(tmp_path / "m", tree).config.sampling.steps == 7
    assert RDM.from_pretrained(tmp_path / "m").config.sampling.steps == 20


def test_checkpoint_config_tells_the_config_without_loading(tmp_path, tiny_official):
    """checkpoint_config (what sample checks its options against before loading): the given config, else an
    rdm_fast file's own, else an official file's config.yaml beside it; None where only the tensors tell or where
    there is no checkpoint. No test called it with a config or on an rdm_fast file, so one that ignored the given
    config, or read no rdm_fast file's config (None: the checks came only after loading), passed."""
    import yaml

    from rdm_fast.rdm import checkpoint_config

    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["scale_factor"] = 0.25
    RDM.from_config(tree).save_pretrained(tmp_path / "own")
    assert checkpoint_config(tmp_path / "own").scale_factor == 0.25
    assert checkpoint_config(tmp_path / "own" / "model.safetensors", "tiny") == RDMConfig.preset("tiny")
    assert checkpoint_config(tmp_path / "missing.ckpt", "tiny") == RDMConfig.preset("tiny")
    assert checkpoint_config(tmp_path / "missing.ckpt") is None
    (tmp_path / "official").mkdir()
    path, _ = official_file(tmp_path / "official", tiny_official)
    assert checkpoint_config(path) is None  # only its tensors tell
    (tmp_path / "official" / "config.yaml").write_text(yaml.safe_dump(tree))
    assert checkpoint_config(path).scale_factor == 0.25
    # safetensors files told apart as from_pretrained tells them: an rdm_fast-layout file without metadata takes
    # the config.json beside it, an official-layout one the config.yaml beside it (both were None: the checks came
    # only after loading)
    from safetensors.torch import save_file

    (tmp_path / "bare").mkdir()
    save_file(RDM.from_config(tree).state_dict(), tmp_path / "bare" / "weights.safetensors")
    assert checkpoint_config(tmp_path / "bare" / "weights.safetensors") is None
    (tmp_path / "bare" / ckpt.CONFIG_FILE).write_text(json.dumps(tree))
    assert checkpoint_config(tmp_path / "bare" / "weights.safetensors").scale_factor == 0.25
    assert RDM.from_pretrained(tmp_path / "bare" / "weights.safetensors").config.scale_factor == 0.25
    save_file(dict(tiny_official[1]), tmp_path / "official" / "weights.safetensors")
    assert checkpoint_config(tmp_path / "official" / "weights.safetensors").scale_factor == 0.25
    assert RDM.from_pretrained(tmp_path / "official" / "weights.safetensors").config.scale_factor == 0.25


def test_train_state_counts_must_be_non_negative(tmp_path):
    """A state.json whose step or EMA update count is negative is no checkpoint of rdm_fast.train (its count would
    be exported as LitEma's num_updates)."""
    file = tmp_path / ckpt.TRAIN_STATE_FILE
    for key in ("step", "ema_updates"):
        file.write_text(json.dumps({"step": 7, "ema_updates": 7, key: -1}))
        with pytest.raises(ckpt.CheckpointError, match=f"{key} = -1 is not a count"):
            ckpt.read_train_state(file)


def test_config_inferred_from_yaml_beside_or_tensors(tmp_path, tiny_official):
    path, _ = official_file(tmp_path, tiny_official)
    assert RDM.from_pretrained(path).config == RDMConfig.preset("tiny")  # by matching tensors to a preset
    import yaml

    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["scale_factor"] = 0.25
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    assert RDM.from_pretrained(path).config.scale_factor == 0.25
    assert RDM.from_pretrained(tmp_path).config.scale_factor == 0.25  # the release folder itself


def test_dtype_and_saved_dtype(tmp_path, tiny_official):
    path, _ = official_file(tmp_path, tiny_official)
    model = RDM.from_pretrained(path, "tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.float().save_pretrained(tmp_path / "half", dtype=torch.float16)
    back = RDM.from_pretrained(tmp_path / "half")
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    assert RDM.from_pretrained(tmp_path / "half", dtype=torch.float16).dtype == torch.float16


def test_from_pretrained_runs_the_model_where_asked(tmp_path):
    """device reaches the loaded model together with dtype (the meta device stands in for a GPU on a machine
    without one). A from_pretrained that dropped the device from its final move passed every test: every load
    was on the CPU."""
    RDM.from_config("tiny").save_pretrained(tmp_path / "m")
    model = RDM.from_pretrained(tmp_path / "m", device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}


# ----------------------------------------------------------------------------------------------- failures
def test_missing_and_misshaped_tensors_are_listed(tmp_path, tiny_official):
    _, full, _, _ = tiny_official
    state = dict(full)
    del state["model.diffusion_model.out.2.bias"]
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(7, 4, 3, 3)
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(ckpt.CheckpointError) as e:
        RDM.from_pretrained(tmp_path / "bad.ckpt", "tiny")
    msg = str(e.value)
    assert "missing 1 tensors: model.diffusion_model.out.2.bias" in msg
    assert "first_stage_model.decoder.conv_in.weight (7, 4, 3, 3) (model: (64, 4, 3, 3))" in msg


def test_mismatch_message_is_one_line_and_keeps_the_lists(tmp_path, tiny_official):
    _, full, _, _ = tiny_official
    torch.save(full, tmp_path / "m.ckpt")
    with pytest.raises(ckpt.StateDictMismatch) as e:
        RDM.from_pretrained(tmp_path / "m.ckpt", "imagenet")
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ckpt.CheckpointError)
    expected = {k: tuple(v.shape) for k, v in meta_model("imagenet").official_state_dict().items()}
    missing = [k for k in expected if k not in full]
    assert e.value.missing == missing and len(missing) > 3
    assert f"missing {len(missing)} tensors: {', '.join(missing[:3])}, ... ({len(missing) - 3} more)" in msg
    assert len(e.value.mismatched) == sum(k in full and tuple(full[k].shape) != s for k, s in expected.items())
    assert f"{len(e.value.mismatched)} tensors of the wrong shape: {e.value.mismatched[0]}" in msg


def test_wrong_config_is_reported(tmp_path, tiny_official):
    _, full, _, _ = tiny_official
    torch.save(full, tmp_path / "m.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="does not match the model configuration"):
        RDM.from_pretrained(tmp_path / "m.ckpt", "imagenet")


def test_unexpected_tensors_are_reported_not_fatal(tmp_path, tiny_official):
    _, full, _, _ = tiny_official
    torch.save({**full, "some_new_head.weight": torch.zeros(3)}, tmp_path / "m.ckpt")
    with pytest.warns(UserWarning, match="ignoring 1 unexpected tensors: some_new_head.weight"):
        RDM.from_pretrained(tmp_path / "m.ckpt", "tiny")


def test_incomplete_ema_is_an_error(tmp_path, tiny_official):
    _, full, _, _ = tiny_official
    path, state = official_file(tmp_path, tiny_official)
    key = ckpt.ema_name("out.2.bias")
    del state[key]
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError, match=key):
        RDM.from_pretrained(path, "tiny")
    RDM.from_pretrained(path, "tiny", use_ema=False)


def test_schedule_mismatch(tmp_path, tiny_official):
    _, full, _, _ = tiny_official
    wrong = torch.cumprod(1 - torch.linspace(0.0015 ** 0.5, 0.015 ** 0.5, 1000) ** 2, 0)
    torch.save({**full, "alphas_cumprod": wrong}, tmp_path / "m.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="linear_start, linear_end"):
        RDM.from_pretrained(tmp_path / "m.ckpt", "tiny")
    # the configured betas over another number of timesteps
    other = torch.cumprod(1 - torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 500) ** 2, 0)
    torch.save({**full, "alphas_cumprod": other}, tmp_path / "m.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="and timesteps in the config"):
        RDM.from_pretrained(tmp_path / "m.ckpt", "tiny")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_torch_file(tmp_path, content):
    (tmp_path / "m.ckpt").write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match="not a readable PyTorch checkpoint"):
        RDM.from_pretrained(tmp_path / "m.ckpt", "tiny")


def test_truncated_torch_file(tmp_path, tiny_official):
    _, full, _, _ = tiny_official
    torch.save(full, tmp_path / "m.ckpt")
    data = (tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "m.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        RDM.from_pretrained(tmp_path / "m.ckpt", "tiny")


def test_truncated_safetensors(tmp_path):
    RDM.from_config("tiny").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match="not a readable safetensors file"):
        RDM.from_pretrained(tmp_path)


def test_pickled_objects_need_opt_in(tmp_path, tiny_official):
    _, full, _, _ = tiny_official
    torch.save({"state_dict": full, "hyper_parameters": argparse.Namespace(lr=1e-4)}, tmp_path / "m.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="allow_pickle=True"):
        RDM.from_pretrained(tmp_path / "m.ckpt", "tiny")
    with pytest.warns(UserWarning, match="runs any code"):
        model = RDM.from_pretrained(tmp_path / "m.ckpt", "tiny", allow_pickle=True)
    assert torch.equal(model.official_state_dict()["model.diffusion_model.out.2.bias"],
                       full["model.diffusion_model.out.2.bias"])


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "m.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="does not hold a state dict"):
        RDM.from_pretrained(tmp_path / "m.ckpt", "tiny")
    # a mapping with other values than tensors (a checkpoint's bookkeeping without its state_dict) is none either
    torch.save({"model.diffusion_model.out.2.bias": torch.zeros(4), "global_step": 3}, tmp_path / "m.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="does not hold a state dict"):
        ckpt.read_state_dict(tmp_path / "m.ckpt")


def test_legacy_torch_files_load(tmp_path, tiny_official):
    """torch.save's pre-1.6 format (a bare pickle, as older checkpoints were written) is read like the zip one."""
    _, full, _, _ = tiny_official
    torch.save({"state_dict": full}, tmp_path / "m.ckpt", _use_new_zipfile_serialization=False)
    state, _ = ckpt.read_state_dict(tmp_path / "m.ckpt")
    assert state.keys() == full.keys() and all(torch.equal(state[k], full[k]) for k in full)


def test_missing_paths(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        RDM.from_pretrained(tmp_path / "nope.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="is a directory, not a file"):  # it said "does not exist"
        ckpt.read_state_dict(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="directory without model.safetensors or a single .ckpt"):
        RDM.from_pretrained(tmp_path)
    # two .ckpt files: which one is meant is not guessed
    for name in ("a.ckpt", "b.ckpt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="directory without model.safetensors or a single .ckpt"):
        ckpt.resolve_file(tmp_path)


def test_newer_format_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = RDM.from_config("tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "rdm_fast", "format_version": "99", "config": json.dumps(model.config.to_dict())})
    with pytest.raises(ckpt.CheckpointError, match="newer rdm_fast"):
        RDM.from_pretrained(tmp_path)


def test_unknown_model_needs_a_config(tmp_path):
    torch.save({"model.diffusion_model.foo": torch.zeros(1)}, tmp_path / "m.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="cannot tell which model"):
        RDM.from_pretrained(tmp_path / "m.ckpt")


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = RDM.from_config("tiny")
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_a_failed_config_json_write_leaves_no_copy_of_another_config(tmp_path, monkeypatch, caplog):
    """config.json is written after the weights: a full disk there left the previous save's copy beside the new
    weights, which loading then reported as edited ("edits to config.json have no effect"). The stale copy goes;
    the new weights load with their own config."""
    RDM.from_config("tiny").save_pretrained(tmp_path)
    tree = RDM.from_config("tiny").config.to_dict()
    tree["model"]["params"]["sampling"] = {**tree["model"]["params"].get("sampling", {}), "steps": 7}
    other = RDM.from_config(tree)
    fail_writes_to(monkeypatch, ckpt, "atomic_write", ckpt.CONFIG_FILE)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert RDM.from_pretrained(tmp_path).config.sampling.steps == 7 and "config.json" not in caplog.text


def test_an_interrupted_config_json_write_leaves_no_copy_of_another_config(tmp_path, monkeypatch):
    """As for a full disk (above), so for Ctrl-C during config.json's write: the previous save's copy goes (from a
    checkpoint mutation audit: removing it on Exceptions alone passed every test)."""
    RDM.from_config("tiny").save_pretrained(tmp_path)
    real = ckpt.atomic_write

    def interrupted(target, *args, **kwargs):
        if Path(target).name == ckpt.CONFIG_FILE:
            raise KeyboardInterrupt
        return real(target, *args, **kwargs)

    monkeypatch.setattr(ckpt, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RDM.from_config("tiny").save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("missing", [ckpt.TRAIN_STATE_FILE, ckpt.WEIGHTS_FILE])
def test_latest_naming_an_incomplete_checkpoint_is_refused(tmp_path, missing):
    """A run's latest file naming a step folder without its state.json or its model.safetensors is an error, not a
    load of half a checkpoint (from a checkpoint mutation audit: dropping either half of the check passed every
    test)."""
    step = tmp_path / ckpt.RUN_CHECKPOINTS / "step_0000004"
    step.mkdir(parents=True)
    for name in (ckpt.TRAIN_STATE_FILE, ckpt.WEIGHTS_FILE):
        (step / name).write_text("")  # only their presence is checked here
    (tmp_path / ckpt.RUN_LATEST).write_text("step_0000004\n")
    assert ckpt.newest_run_checkpoint(tmp_path) == step
    (step / missing).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"latest names .*step_0000004, which is not a complete checkpoint"):
        ckpt.newest_run_checkpoint(tmp_path)


def test_edited_config_json_is_reported_not_used(tmp_path, caplog):
    """config.json beside model.safetensors is a copy: the stored config loads, and a differing or unreadable copy
    is reported."""
    RDM.from_config("tiny").save_pretrained(tmp_path)
    RDM.from_pretrained(tmp_path)
    assert "config.json" not in caplog.text  # the untouched copy
    cfg = json.loads((tmp_path / ckpt.CONFIG_FILE).read_text())
    params = cfg["model"]["params"]
    params["sampling"] = {**params.get("sampling", {}), "steps": 7}
    (tmp_path / ckpt.CONFIG_FILE).write_text(json.dumps(cfg))
    assert RDM.from_pretrained(tmp_path).config.sampling.steps != 7
    assert "differs from the config stored in" in caplog.text and "(model.params.sampling.steps)" in caplog.text
    (tmp_path / ckpt.CONFIG_FILE).write_text("{")
    RDM.from_pretrained(tmp_path)
    assert "config.json is unreadable" in caplog.text


def test_directory_with_both_formats_says_which_loads(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rdm_fast")
    RDM.from_config("tiny").save_pretrained(tmp_path)
    (tmp_path / "model.ckpt").write_bytes(b"an official checkpoint beside it")
    RDM.from_pretrained(tmp_path)
    assert "loading model.safetensors (not model.ckpt)" in caplog.text


def _own_file(directory: Path, **tensors: torch.Tensor) -> Path:
    """The tiny model saved in rdm_fast's format with the given tensors replaced (as stored: no checks)."""
    from safetensors.torch import save_file

    model = RDM.from_config("tiny")
    state = {**{k: v.contiguous() for k, v in model.state_dict().items()}, **tensors}
    directory.mkdir()
    save_file(state, directory / ckpt.WEIGHTS_FILE,
              metadata={"format": "rdm_fast", "format_version": "1", "config": json.dumps(model.config.to_dict())})
    return directory


def test_non_finite_weights_are_refused(tmp_path, tiny_official):
    """NaN or infinite weights sample black images: loading refuses them, naming the tensors, in every format."""
    bias = RDM.from_config("tiny").state_dict()["unet.out_conv.bias"]
    for value in (math.nan, math.inf):
        name = f"own_{value}"
        with pytest.raises(ckpt.CheckpointError, match=r"1 tensors hold NaN or infinite values: unet.out_conv.bias;"):
            RDM.from_pretrained(_own_file(tmp_path / name, **{"unet.out_conv.bias": torch.full_like(bias, value)}))
    _, full, _, _ = tiny_official
    bad = {k: v.clone() for k, v in full.items() if k.startswith("model.diffusion_model.out.")}
    for v in bad.values():
        v.view(-1)[0] = -math.inf
    torch.save({**full, **bad}, tmp_path / "m.ckpt")
    with pytest.raises(ckpt.CheckpointError, match=r"m.ckpt: 4 tensors hold NaN or infinite values: "
                                                   r"model.diffusion_model.out.\d.(weight|bias), .* \(1 more\)") as e:
        RDM.from_pretrained(tmp_path / "m.ckpt", "tiny")
    assert len(bad) == 4 and "\n" not in str(e.value)


def test_integer_weights_are_refused(tmp_path):
    weight = RDM.from_config("tiny").state_dict()["unet.out_conv.weight"]
    path = _own_file(tmp_path / "int", **{"unet.out_conv.weight": weight.to(torch.int32)})
    with pytest.raises(ckpt.CheckpointError, match=r"1 tensors are not floating-point: unet.out_conv.weight "
                                                   r"\(torch.int32\)"):
        RDM.from_pretrained(path)


@pytest.mark.parametrize("to", ["rdm_fast", "official"])
def test_convert_refuses_weights_beyond_the_range_of_the_dtype(tmp_path, to):
    """A weight of 1e6 is fine in float32 and bfloat16 but infinite in float16: convert says which, writes nothing."""
    from rdm_fast import convert

    model = RDM.from_config("tiny")
    with torch.no_grad():
        model.unet.out_conv.bias[0] = 1e6
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=r"1 tensors hold values beyond the range of torch.float16, which would "
                                         r"become infinite: (unet.out_conv.bias|model.diffusion_model.out.2.bias);"):
        convert.main([str(tmp_path / "src"), "--out", str(tmp_path / "half"), "--dtype", "fp16", "--to", to])
    assert not (tmp_path / "half").exists()
    assert convert.main([str(tmp_path / "src"), "--out", str(tmp_path / "bf16"), "--dtype", "bf16", "--to", to]) == 0


def test_damaged_config_names_the_file(tmp_path):
    """An rdm_fast file whose metadata hold a broken config or format version, or a config.json beside a file
    without them that is no JSON: a CheckpointError naming the file."""
    from safetensors.torch import save_file

    model = RDM.from_config("tiny")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = json.dumps(model.config.to_dict())
    cases = {"json": ({"format_version": "1", "config": "{'single': 'quotes'}"}, "its metadata.*no readable config"),
             "version": ({"format_version": "x", "config": config}, "format_version .* 'x', is not a number"),
             "none": ({"format_version": "1"}, "its metadata.*no readable config"),
             "list": ({"format_version": "1", "config": "[1]"}, "its metadata.*not a JSON object")}
    for name, (metadata, message) in cases.items():
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / ckpt.WEIGHTS_FILE, metadata={"format": "rdm_fast", **metadata})
        with pytest.raises(ckpt.CheckpointError, match=f"{tmp_path / name / ckpt.WEIGHTS_FILE}.*{message}"):
            RDM.from_pretrained(tmp_path / name)
    (tmp_path / "beside").mkdir()
    save_file(state, tmp_path / "beside" / ckpt.WEIGHTS_FILE)
    (tmp_path / "beside" / ckpt.CONFIG_FILE).write_text('{"model": ')
    with pytest.raises(ckpt.CheckpointError, match=f"{tmp_path / 'beside' / ckpt.CONFIG_FILE}: no readable config"):
        RDM.from_pretrained(tmp_path / "beside")


@pytest.mark.parametrize("dtype", [torch.int8, "fp16", torch.float64])
def test_save_and_load_refuse_dtypes_the_model_cannot_run_in(tmp_path, dtype):
    model = RDM.from_config("tiny")
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.float16 or torch.bfloat16"):
        model.save_pretrained(tmp_path / "bad", dtype=dtype)
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    model.save_pretrained(tmp_path / "good")
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.float16 or torch.bfloat16"):
        RDM.from_pretrained(tmp_path / "good", dtype=dtype)
    with pytest.raises(ValueError, match="dtype must be torch.float32"):
        ckpt.cast_floats({"w": torch.ones(1)}, dtype)


def test_cast_floats_leaves_integer_tensors_alone():
    """Only the floating-point tensors take the stored precision: an integer one (LitEma's update count in an
    exported checkpoint) halved would be rounded, or past 65504 infinite (and refused as beyond the range)."""
    count = torch.tensor(100_000, dtype=torch.int32)
    cast = ckpt.cast_floats({"model_ema.num_updates": count, "w": torch.ones(2)}, torch.float16)
    assert cast["model_ema.num_updates"] is count and cast["w"].dtype == torch.float16


def test_save_pretrained_refuses_files_and_other_outputs(tmp_path):
    """From a Python API audit: saving into a database's folder mixed the files; a path ending in .safetensors
    became a folder of that name; a file gave a bare "[Errno 17] File exists"."""
    from rdm_fast.retrieval import write_database

    model = RDM.from_config("tiny")
    db = write_database(tmp_path / "db", np.zeros((2, 8), np.float32), {"name": "e", "dim": 8, "normalized": False})
    with pytest.raises(ValueError, match="holds a database: save the model into a folder of its own"):
        model.save_pretrained(db)
    with pytest.raises(ValueError, match=r"model.safetensors names a file: the model is saved into a folder"):
        model.save_pretrained(tmp_path / "m" / "model.safetensors")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file, not a folder to save the model into"):
        model.save_pretrained(tmp_path / "afile")
    assert not (tmp_path / "m").exists() and not (db / "model.safetensors").exists()
    model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")  # over itself: a model's folder
    (tmp_path / "m" / "state.json").write_text("{}")  # a training checkpoint's folder: its EMA weights alone
    with pytest.raises(ValueError, match="holds a training checkpoint: save the model into a folder of its own"):
        model.save_pretrained(tmp_path / "m")
    (tmp_path / "samples").mkdir()  # a sample run's images (a checkpoint mutation audit: not tested)
    (tmp_path / "samples" / "sample_00000.png").write_bytes(b"")
    with pytest.raises(ValueError, match="holds a sample run: save the model into a folder of its own"):
        model.save_pretrained(tmp_path / "samples")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_official_checkpoints_load(tmp_path, tiny_official, dtype):
    """A checkpoint stored in float16 or bfloat16 (every tensor halved, the schedule buffers too) loads: its
    alphas_cumprod are the configured ones to the precision they are stored in. A wrong schedule is still
    refused."""
    path, state = official_file(tmp_path, tiny_official)
    half = {k: v.to(dtype) if v.is_floating_point() and k != "model_ema.decay" else v for k, v in state.items()}
    half["alphas_cumprod"] = meta_model("tiny").schedule.alphas_cumprod.to(dtype)
    torch.save({"state_dict": half}, path)
    model = RDM.from_pretrained(path, "tiny")
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.official_state_dict()[key], half[ckpt.ema_name(key[len(ckpt.UNET_PREFIX):])].float())
    half["alphas_cumprod"] = torch.cumprod(1 - torch.linspace(0.0015 ** 0.5, 0.015 ** 0.5, 1000) ** 2, 0).to(dtype)
    torch.save({"state_dict": half}, path)
    with pytest.raises(ckpt.CheckpointError, match="linear_start, linear_end"):
        RDM.from_pretrained(path, "tiny")


def test_ema_counters_without_ema_weights_load_the_raw_weights(tmp_path, tiny_official):
    """A checkpoint whose EMA copies were pruned but whose counters remain has one set of UNet weights: those."""
    _, full, _, _ = tiny_official
    path, state = official_file(tmp_path, tiny_official, ema=False)
    torch.save({**state, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3)}, path)
    got = RDM.from_pretrained(path, "tiny").official_state_dict()
    assert all(torch.equal(got[k], full[k]) for k in full)


def test_a_weight_of_another_shape_with_as_many_values_is_a_mismatch(tmp_path, tiny_official):
    """A 1x1 convolution stored as a linear layer's (out, in) matrix (as later LDM UNets store proj_in) holds as
    many values as the model's (out, in, 1, 1) one: a mismatch all the same, named like any other."""
    _, full, _, _ = tiny_official
    key = next(k for k in full if k.endswith("proj_in.weight"))
    torch.save({**full, key: full[key].flatten(1)}, tmp_path / "m.ckpt")
    with pytest.raises(ckpt.StateDictMismatch) as e:
        RDM.from_pretrained(tmp_path / "m.ckpt", "tiny")
    assert e.value.mismatched == [f"{key} {tuple(full[key].shape[:2])} (model: {tuple(full[key].shape)})"]


def test_unexpected_tensors_of_an_rdm_fast_file_are_reported(tmp_path):
    """Tensors an rdm_fast file holds beyond the model's (another version's or model's) are named, not dropped
    silently."""
    path = _own_file(tmp_path / "own", **{"unet.extra_head.weight": torch.zeros(3)})
    with pytest.warns(UserWarning, match="ignoring 1 unexpected tensors: unet.extra_head.weight"):
        RDM.from_pretrained(path)


def test_a_checkpoints_own_yaml_wins_over_the_folders_config_yaml(tmp_path, tiny_official):
    """Beside NAME.ckpt, NAME.yaml describes that file; config.yaml is the folder's (a release's single model)."""
    import yaml

    path, _ = official_file(tmp_path, tiny_official)
    for name, scale in (("model.yaml", 0.25), ("config.yaml", 0.5)):
        tree = RDMConfig.preset("tiny").to_dict()
        tree["model"]["params"]["scale_factor"] = scale
        (tmp_path / name).write_text(yaml.safe_dump(tree))
    assert RDM.from_pretrained(path).config.scale_factor == 0.25

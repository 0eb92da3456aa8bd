"""Tuning measurements on a GPU, for choosing defaults (not a benchmark of record): CUDA-graph replays, so that
launch gaps do not hide kernel time (the long training calls of 1. are timed eagerly).

In this order (the newest first, the longest sweep last, so that a cut-off run loses the least):

1. Training attention per self-attention level: forward + backward of our kernels vs SDPA, and dq's distance
   from float64 where keys and values share a component (the case the backward's delta pass fixed), for both.
2. Attention per level (imagenet, rdm768; self and cross): our flash kernel vs scaled_dot_product_attention (the
   choice ``auto`` mode measures per shape at run time).
3. ``add_bias`` (``kernels.glue.ADD_BIAS_TUNING``) over the calls of an imagenet step, against clones.
4. The UNet's Upsample: nearest x2 + 3x3 conv (the definition) vs the stride-2 transposed convolution with
   summed taps (the fast path), at the imagenet shapes.
5. The channels_last GroupNorm's three kernels (``kernels.group_norm.NHWC_TUNING``): every combination of values
   per tile, warps, programs per SM, channel block and statistics-loop unrolling, timed on the GroupNorm calls of
   one imagenet guided step (their shapes and counts, batch 128, bf16), against a copy of the same tensors
   (``clone``: one read, one write).

Usage: python bench/gpu_tune.py [--out DIR]; writes tune.txt there.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_step import open_log  # bench/ is this script's directory
from rdm_fast import ops
from rdm_fast.kernels import group_norm as gn_kernels
from rdm_fast.models.layers import upsample_conv_weight

# (C, H, W): calls in one imagenet UNet call (recorded from the model; batch 128 = 64 guided images)
IMAGENET_GROUP_NORMS = {(192, 64, 64): 8, (192, 32, 32): 1, (384, 32, 32): 11, (384, 16, 16): 1, (576, 16, 16): 11,
                        (576, 8, 8): 1, (960, 8, 8): 16, (1920, 8, 8): 2, (1536, 8, 8): 1, (1536, 16, 16): 1,
                        (1152, 16, 16): 1, (960, 16, 16): 1, (960, 32, 32): 1, (768, 32, 32): 1, (576, 32, 32): 1,
                        (576, 64, 64): 1, (384, 64, 64): 2}
IMAGENET_UPSAMPLES = [(960, 8, 8), (576, 16, 16), (384, 32, 32)]  # (C, H, W) of the input
# ((H, W, C), with a residual): add_bias calls in one imagenet UNet call (recorded from the model)
IMAGENET_ADD_BIAS = {((64, 64, 192), False): 1, ((64, 64, 192), True): 5, ((32, 32, 192), False): 1,
                     ((32, 32, 384), True): 10, ((16, 16, 384), False): 1, ((16, 16, 576), True): 10,
                     ((8, 8, 576), False): 1, ((8, 8, 960), True): 13, ((16, 16, 960), False): 1,
                     ((32, 32, 576), False): 1, ((64, 64, 384), False): 1, ((64, 64, 3), False): 1}
BATCH = 128


def graph_ms(fn, calls: int = 10, replays: int = 7) -> float:
    """Median time of one ``fn()`` replayed from a CUDA graph of ``calls`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def _group_norm_inputs(shapes, batch: int, dev: torch.device) -> dict:
    inputs = {}
    for (c, h, w) in shapes:
        x = torch.randn(batch, c, h, w, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        inputs[(c, h, w)] = (x, torch.randn(c, device=dev), torch.randn(c, device=dev),
                             torch.randn(batch, c, device=dev))
    return inputs


def tune_group_norm(log, device: str = "cuda") -> None:
    inputs = _group_norm_inputs(IMAGENET_GROUP_NORMS, BATCH, torch.device(device))
    copy = sum(n * graph_ms(lambda x=inputs[s][0]: x.clone(memory_format=torch.preserve_format))
               for s, n in IMAGENET_GROUP_NORMS.items())
    log(f"GroupNorm calls of one imagenet step: {sum(IMAGENET_GROUP_NORMS.values())}; the same tensors cloned "
        f"(1 read + 1 write each): {copy:.3f} ms; 3 passes at that bandwidth: {1.5 * copy:.3f} ms")
    default = dict(gn_kernels.NHWC_TUNING)
    rows = []
    for tile, warps, waves, max_c, unroll in itertools.product((2048, 4096), (4, 8), (2, 4, 8), (64, 128), (1, 2)):
        gn_kernels.NHWC_TUNING.update(tile=tile, warps=warps, waves=waves, max_block_c=max_c, unroll=unroll)
        try:
            per = {s: graph_ms(lambda t=inputs[s]: gn_kernels.group_norm(t[0], t[1], t[2], 32, 1e-5, add=t[3],
                                                                        silu=True))
                   for s in IMAGENET_GROUP_NORMS}
        except Exception as exc:  # a config that does not compile or run is reported, not fatal
            log(f"tile {tile} warps {warps} waves {waves} max_block_c {max_c} unroll {unroll}: "
                f"{type(exc).__name__}: {exc}")
            continue
        total = sum(n * per[s] for s, n in IMAGENET_GROUP_NORMS.items())
        rows.append((total, tile, warps, waves, max_c, unroll, per))
        # each configuration as it finishes: a phase cut off by its time limit keeps what it measured
        log(f"{total:8.3f} ms: tile {tile} warps {warps} waves {waves} max_block_c {max_c} unroll {unroll}")
    gn_kernels.NHWC_TUNING.update(default)
    if not rows:
        log("GroupNorm: no configuration ran")
        return
    rows.sort(key=lambda r: r[0])
    log(f"{'step ms':>8s} {'tile':>5s} {'warps':>5s} {'waves':>5s} {'max_c':>5s} {'unroll':>6s}   (default {default})")
    for total, tile, warps, waves, max_c, unroll, _ in rows:
        log(f"{total:8.3f} {tile:5d} {warps:5d} {waves:5d} {max_c:5d} {unroll:6d}")
    best = rows[0][-1]
    log("per shape, best config (us):   " + ", ".join(f"{c}x{h}x{w} {1000 * t:.1f}" for (c, h, w), t in best.items()))
    per_shape_best = {s: min(r[-1][s] for r in rows) for s in IMAGENET_GROUP_NORMS}
    log(f"best config per shape, summed: {sum(n * per_shape_best[s] for s, n in IMAGENET_GROUP_NORMS.items()):.3f} ms")


def tune_add_bias(log, device: str = "cuda") -> None:
    """``add_bias`` over the calls of one imagenet step (batch 128, bf16) for every tile / warps / column block,
    against clones of the same outputs (one read, one write: the floor without the residual read)."""
    from rdm_fast.kernels import glue as glue_kernels

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args = {}
    for (hwc, res), _ in IMAGENET_ADD_BIAS.items():
        x = torch.randn(BATCH, *hwc, device=dev, dtype=dtype)
        args[(hwc, res)] = (x, torch.randn(hwc[-1], device=dev, dtype=dtype), torch.randn_like(x) if res else None)
    copy = sum(n * graph_ms(lambda x=args[k][0]: x.clone()) for k, n in IMAGENET_ADD_BIAS.items())
    default = dict(glue_kernels.ADD_BIAS_TUNING)
    rows = []
    for tile, warps, max_c in itertools.product((2048, 4096, 8192), (4, 8), (64, 256)):
        glue_kernels.ADD_BIAS_TUNING.update(tile=tile, warps=warps, max_block_c=max_c)
        total = sum(n * graph_ms(lambda a=args[k]: ops.add_bias(*a)) for k, n in IMAGENET_ADD_BIAS.items())
        rows.append((total, tile, warps, max_c))
    glue_kernels.ADD_BIAS_TUNING.update(default)
    log(f"add_bias calls of one imagenet step: {sum(IMAGENET_ADD_BIAS.values())}; the outputs cloned: {copy:.3f} ms "
        f"(default {default})")
    for total, tile, warps, max_c in sorted(rows):
        log(f"{total:8.3f} ms  tile {tile:5d} warps {warps} max_block_c {max_c}")


def tune_upsample(log) -> None:
    dev = torch.device("cuda")
    total_def = total_fast = 0.0
    for c, h, w in IMAGENET_UPSAMPLES:
        x = torch.randn(BATCH, c, h, w, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(c, c, 3, 3, device=dev, dtype=torch.bfloat16) * 0.02).contiguous(
            memory_format=torch.channels_last)
        bias = torch.randn(c, device=dev, dtype=torch.bfloat16)
        wt = upsample_conv_weight(weight)
        ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
        fast = F.conv_transpose2d(x, wt, bias, stride=2, padding=1)
        err = float((fast.float() - ref.float()).norm() / ref.float().norm())
        t_def = graph_ms(lambda: F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1))
        t_conv = graph_ms(lambda: F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, None, padding=1))
        t_fast = graph_ms(lambda: F.conv_transpose2d(x, wt, None, stride=2, padding=1))
        t_fast_bias = graph_ms(lambda: ops.add_bias(F.conv_transpose2d(x, wt, None, stride=2, padding=1).permute(
            0, 2, 3, 1), bias))
        total_def, total_fast = total_def + t_def, total_fast + t_fast_bias
        log(f"upsample {c}x{h}x{w} -> x2: interpolate+conv+bias {t_def:.3f} ms (without bias {t_conv:.3f}), "
            f"transposed conv {t_fast:.3f} ms, + add_bias {t_fast_bias:.3f} ms; rel. err {err:.1e}")
    log(f"upsample, imagenet's three: definition {total_def:.3f} ms, fast path {total_fast:.3f} ms")


# (batch, query tokens, key tokens, channels): the imagenet (batch 128 self / 64 cross: the conditional half) and
# rdm768 (32 / 16) attention levels; head dim 32
ATTENTION_SHAPES = {"imagenet": [(128, 1024, 1024, 384), (128, 256, 256, 576), (128, 64, 64, 960),
                                 (64, 1024, 4, 384), (64, 256, 4, 576), (64, 64, 4, 960)],
                    "rdm768": [(32, 2304, 2304, 448), (32, 576, 576, 896), (32, 144, 144, 1344), (32, 36, 36, 1792),
                               (16, 2304, 11, 448), (16, 576, 11, 896), (16, 144, 11, 1344), (16, 36, 11, 1792)]}


def tune_attention(log, shapes_by_model: dict = ATTENTION_SHAPES, device: str = "cuda") -> None:
    """Our flash kernel vs PyTorch's scaled_dot_product_attention per attention level, both replayed from CUDA
    graphs (eager per-op rounds at the small levels measure launch overhead, not GPU time)."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    for model, shapes in shapes_by_model.items():
        for b, nq, nk, c in shapes:
            heads = c // 32
            q = torch.randn(b, nq, c, device=dev, dtype=dtype)
            k, v = (torch.randn(b, nk, c, device=dev, dtype=dtype) for _ in range(2))

            def sdpa():
                split = (lambda t: t.view(t.shape[0], t.shape[1], heads, 32).transpose(1, 2))
                o = F.scaled_dot_product_attention(split(q), split(k), split(v))
                return o.transpose(1, 2).reshape(b, nq, c)

            with ops.use_mode("fast"):  # the Triton kernels (auto mode may itself pick SDPA for this shape)
                err = float((ops.attention(q, k, v, heads).float() - sdpa().float()).norm() / sdpa().float().norm())
                ours = graph_ms(lambda: ops.attention(q, k, v, heads))
            theirs = graph_ms(sdpa)
            log(f"attention {model} b{b} q{nq} k{nk} c{c}: ours {1000 * ours:8.1f} us, sdpa {1000 * theirs:8.1f} us "
                f"({theirs / ours:.2f}x), rel. diff {err:.1e}; {forward_choice()}")


def tune_attention_backward(log, device: str = "cuda") -> None:
    """Forward + backward (gradients of q, k, v) of our kernels against SDPA at the self-attention levels, and the
    relative L2 distance of dq from float64 (on the first two batch items) where keys and values share a
    component. Timed with ``triton.testing.do_bench`` (median) at the levels of 256 tokens or more only: below
    that an eager call's time is its launches'."""
    import triton.testing

    dev = torch.device(device)
    for model, shapes in ATTENTION_SHAPES.items():
        for b, nq, nk, c in (s for s in shapes if s[1] == s[2]):
            heads = c // 32
            gen = torch.Generator(device=dev).manual_seed(0)
            shared = lambda n, s: s * torch.randn(b, 1, c, device=dev, generator=gen) + torch.randn(  # noqa: E731
                b, n, c, device=dev, generator=gen)
            leaves = [t.to(torch.bfloat16).requires_grad_(True)
                      for t in (0.3 * torch.randn(b, nq, c, device=dev, generator=gen), shared(nk, 3.0),
                                shared(nk, 3.0))]
            grad_out = torch.randn(b, nq, c, device=dev, generator=gen).to(torch.bfloat16)

            def split(t):
                return t.view(t.shape[0], t.shape[1], heads, 32).transpose(1, 2)

            def sdpa(q, k, v):
                return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, nq, c)

            def ours(q, k, v):
                with ops.use_mode("fast"):
                    return ops.attention(q, k, v, heads)

            exact = [t.detach()[:2].double().requires_grad_(True) for t in leaves]
            out = F.scaled_dot_product_attention(*(split(t) for t in exact)).transpose(1, 2).reshape(2, nq, c)
            want = torch.autograd.grad(out, exact, grad_out[:2].double())[0]
            row = []
            for name, fn in (("ours", ours), ("sdpa", sdpa)):
                def step(fn=fn):
                    return torch.autograd.grad(fn(*leaves), leaves, grad_out)

                timed = ""
                if nq >= 256:
                    ms = triton.testing.do_bench(step, warmup=50, rep=200, return_mode="median")
                    timed = f" {1000 * ms:8.1f} us,"
                err = float((step()[0][:2].double() - want).norm() / want.norm())
                row.append(f"{name}{timed} dq off float64 {err:.1e}")
            log(f"attention fwd+bwd {model} b{b} n{nq} c{c}: " + "; ".join(row))


def forward_choice() -> str:
    """The forward kernel's autotuned configuration for the last shape."""
    from rdm_fast.kernels import attention as kernels

    best = getattr(kernels._attn_fwd_kernel, "best_config", None)
    return f"config {best.kwargs if best else '?'} warps {best.num_warps if best else '?'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    args = parser.parse_args()
    log = open_log(Path(args.out) / "tune.txt")
    torch.backends.cudnn.benchmark = False
    tune_attention_backward(log)  # first: the newest change (2026-11-27); needs autograd, outside inference mode
    with torch.inference_mode():
        tune_attention(log)
        tune_add_bias(log)
        tune_upsample(log)
        tune_group_norm(log)  # last: the longest sweep, and its defaults were confirmed in two sessions


if __name__ == "__main__":
    main()

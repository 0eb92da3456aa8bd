"""Guided denoising step on a GPU: parity, timings against the PyTorch peer, and where the time goes.

For each preset (default: the anchor cases of bench/RESULTS.md, imagenet at 64 images and rdm768 at 16, then
small batches of 4 and 1 images with timings only; bf16, channels-last):

1. parity: eps of one guided step from the fast path (what ``RDM.sample`` runs) and from the plain-PyTorch
   reference path, both in bf16, against the same step in float32 through the reference path (TF32 off);
2. timings (CUDA events, median of 20 after 3 warm-ups, same process and weights): ``rdm_fast`` (CUDA graph),
   ``rdm_fast-eager``, ``torch-eager`` (our float32-norm reference ops + ``scaled_dot_product_attention``:
   slower than the anchors' eager autocast peer), ``rdm_fast+fast-ops`` (the graph with rdm_fast's kernels forced,
   against auto mode's timed choices between them and vendor kernels) and, with ``--variants ...,torch-compile``,
   ``torch-compile`` (that path through ``torch.compile``);
3. a whole ``RDM.sample`` trajectory (20 DDIM steps, latents), per step: the guided steps plus the sampler's
   update and the per-step Python;

then, once every preset's timings are in (a time limit cuts these diagnostics, not a preset's timings), for the
presets with parity checks:

4. for 4 images, the bf16 and fp16 trajectories and their decoded images against the float32 reference
   trajectory from the same noise (latents' relative L2 error, images' PSNR, finite, not blank);
5. a per-kernel breakdown of the fast eager step (torch.profiler, 3 steps), grouped by kind;
6. the first stage's decoder at bench_decode.py's sizes (rdm768: 4 latents, imagenet: 16): parity of
   ``RDM.decode`` and of the NCHW plain-PyTorch decoder in bf16 against float32, and their CUDA-event timings.

Run by ``bench/gpu_check.sh``; prints a short table last (also when stopped by SIGTERM at its time limit) and
writes the full tables to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import statistics
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch

# bench/ (bench_step), then the checkout under test (with its in-place extension) ahead of any installed copy
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_decode import CASES as DECODE_LATENTS, decode_fn  # noqa: E402
from bench_step import make_case, step_fn  # noqa: E402

from rdm_fast import ops  # noqa: E402


def cuda_median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


KINDS = [  # (kind, substrings of the kernel name), first match wins
    ("attention (ours)", ("_attn_fwd",)),
    ("group norm (ours)", ("group_norm", "GroupNorm", "_nhwc_stats", "_nhwc_finalize", "_nhwc_apply")),
    ("bias + residual (ours)", ("_add_bias",)),
    ("thin convolution (ours)", ("_conv3x3", "_taps_kernel", "_sum_taps_kernel")),
    ("layer norm (ours)", ("layer_norm",)),
    ("geglu (ours)", ("geglu",)),
    ("attention (sdpa)", ("flash", "fmha", "attention")),
    ("convolution", ("conv", "implicit", "fprop", "dgrad", "xmma", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "matmul")),
    ("cat / copy / layout", ("Cat", "copy", "Copy", "transpose", "permute")),
    ("elementwise", ("elementwise", "vectorized", "Elementwise", "reduce", "Reduce", "upsample")),
]


def kind_of(name: str) -> str:
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def profile_kernels(fn, steps: int = 3) -> list[tuple[str, float, int]]:
    """(kernel name, CUDA ms per step, launches per step), slowest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:  # kernels (and device copies/memsets)
            totals[ev.name][0] += ev.time_range.elapsed_us() / 1000 / steps
            totals[ev.name][1] += 1 / steps
    return sorted(((n, t, int(round(c))) for n, (t, c) in totals.items()), key=lambda r: -r[1])


def idle_time(intervals: list[tuple[float, float, str]], top: int = 5) -> dict:
    """Where a stream of device work (start, end, name) sat idle: its span (first start to last end), the time
    covered by at least one interval, the idle rest, the number of idle gaps and their median, and the ``top``
    longest gaps with the work before and after each."""
    if not intervals:
        return {"span": 0.0, "busy": 0.0, "idle": 0.0, "gaps": 0, "median_gap": 0.0, "longest": []}
    work = sorted(intervals)
    busy, gaps = 0.0, []
    cur_start, cur_end, cur_name = work[0]
    for start, end, name in work[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_name, name))
            cur_start, cur_end = start, end
        elif end > cur_end:
            cur_end = end
        cur_name = name if end >= cur_end else cur_name
    busy += cur_end - cur_start
    span = max(e for _, e, _ in work) - work[0][0]
    sizes = sorted(g for g, _, _ in gaps)
    return {"span": span, "busy": busy, "idle": span - busy, "gaps": len(gaps),
            "median_gap": statistics.median(sizes) if sizes else 0.0,
            "longest": sorted(gaps, key=lambda g: -g[0])[:top]}


def graph_idle(fn, steps: int = 3) -> dict:
    """:func:`idle_time` of the device work (kernels, memsets, copies) of one call of ``fn`` (a CUDA graph
    replay), in microseconds, averaged over ``steps`` calls profiled one at a time; ``ops``: device operations per
    call; ``longest``: the last call's longest gaps."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    stats, ops_per_call = [], []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        work = [(ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                if ev.device_type == torch.autograd.DeviceType.CUDA]
        stats.append(idle_time(work))
        ops_per_call.append(len(work))
    out = {k: statistics.mean(st[k] for st in stats) for k in ("span", "busy", "idle", "gaps", "median_gap")}
    out.update(ops=statistics.mean(ops_per_call), longest=stats[-1]["longest"])
    return out


COPY_OPS = ("aten.copy_", "aten.cat", "aten.clone", "aten._to_copy", "aten.contiguous")


def copy_sites(fn) -> list[tuple[str, int]]:
    """(op, shapes and strides, call site in rdm_fast, calls) of every copy-like ATen op of one call of ``fn``:
    what the "cat / copy / layout" kernels of the profile come from."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = defaultdict(int)

    class Sites(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if name.startswith(COPY_OPS):
                flat = [a for a in args if torch.is_tensor(a)] or [a for a in args[0] if torch.is_tensor(a)]
                layout = ", ".join(f"{tuple(t.shape)}@{t.stride()}" for t in flat)
                frames = [f for f in traceback.extract_stack() if "rdm_fast" in f.filename]
                site = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
                counts[f"{name} {layout} at {site}"] += 1
            return func(*args, **(kwargs or {}))

    with Sites():
        fn()
    return sorted(counts.items(), key=lambda kv: -kv[1])


def module_times(fn, unet, steps: int = 3, cuda: bool = True) -> list[tuple[str, float, int]]:
    """(module kind and input size, ms per step, calls per step), slowest first: the CUDA time of the kernels
    launched inside each ResBlock / SpatialTransformer / Downsample / Upsample call (CPU time when
    ``cuda=False``: for smoke runs), through profiler ranges opened by forward hooks."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from rdm_fast.models.layers import Upsample
    from rdm_fast.models.unet import Downsample, ResBlock, SpatialTransformer

    # open ranges by module, held here: an attribute on the module would stay behind and break a later
    # copy.deepcopy of the model (a profiler RecordFunction cannot be copied)
    open_ranges: dict[int, list] = defaultdict(list)

    def enter(module, args):
        x = args[0]
        name = f"rdm/{type(module).__name__} {x.shape[1]}x{x.shape[2]}x{x.shape[3]}"
        open_ranges[id(module)].append(record_function(name))
        open_ranges[id(module)][-1].__enter__()

    def leave(module, args, output):
        open_ranges[id(module)].pop().__exit__(None, None, None)

    hooks = []
    for m in unet.modules():
        if isinstance(m, (ResBlock, SpatialTransformer, Downsample, Upsample)):
            hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        fn()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            if cuda:
                torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for ev in prof.key_averages():
        if ev.key.startswith("rdm/"):
            us = (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)) if cuda \
                else ev.cpu_time_total
            rows.append((ev.key[4:], us / 1000 / steps, round(ev.count / steps)))
    return sorted(rows, key=lambda r: -r[1])


def run_preset(result: dict, variants: list[str], log, *, checks: bool = True) -> None:
    """The headline measurements of one preset (``result["preset"]`` at ``result["images"]``) into ``result``, as
    they come: parity (with ``checks``), the variants' step timings and ``RDM.sample``'s cost per step."""
    model, x, ctx = _case(result)
    if checks:
        check_parity(model, x, ctx, result, log)
    torch.cuda.empty_cache()
    time_variants(model, x, ctx, variants, result, log)
    if checks:
        time_sampling(model, x, ctx, result, log)
    del model
    torch.cuda.empty_cache()


def diagnose_preset(result: dict, out: Path, log) -> None:
    """What runs after every preset's timings (so that a time limit cuts these, not a preset's timings): the
    half-precision trajectories, the per-kernel profile and the decoder, on the same weights (same seed)."""
    model, x, ctx = _case(result)
    preset, images = result["preset"], result["images"]
    trajectory_parity(model, x, ctx, result, log)
    profile_step(model, x, ctx, images, out, result, log)
    time_decode(model, x[:DECODE_LATENTS.get(preset, images)], result, log)
    del model
    torch.cuda.empty_cache()


def _case(result: dict):
    """The preset's model, latents and contexts (seed 0: the same weights for the timings and the diagnostics)."""
    torch.manual_seed(0)
    return make_case(result["preset"], result["images"], torch.device("cuda"), torch.bfloat16)


def check_parity(model, x, ctx, result: dict, log) -> None:
    """eps of the fast and the plain-PyTorch bf16 step against the float32 plain-PyTorch step (TF32 off)."""
    preset = result["preset"]
    try:
        with torch.inference_mode():
            with ops.use_mode("auto"):
                eps_fast = step_fn("rdm_fast-eager", model, x, ctx)(x, 500).float()
            with ops.use_mode("reference"):
                eps_ref = step_fn("torch-reference", model, x, ctx)(x, 500).float()
                ref32 = copy.deepcopy(model).float()
                tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                try:
                    eps32 = step_fn("torch-reference", ref32, x, ctx.float())(x, 500).float()
                finally:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
                del ref32
        result["err_fast"] = rel_err(eps_fast, eps32)
        result["err_ref_bf16"] = rel_err(eps_ref, eps32)
        result["finite"] = bool(torch.isfinite(eps_fast).all())
        # the fast path rounds at other places than plain bf16, not more often: much worse than it is a bug
        flag = "" if result["finite"] and result["err_fast"] <= 1.25 * result["err_ref_bf16"] else \
            "  <-- PARITY PROBLEM: the fast path is off by more than 1.25x plain bf16's error, or not finite"
        log(f"[{preset}] parity vs fp32 reference: fast bf16 {result['err_fast']:.2e}, "
            f"reference bf16 {result['err_ref_bf16']:.2e}, finite {result['finite']}{flag}")
    except Exception:
        log(f"[{preset}] parity FAILED\n{traceback.format_exc()}")


def time_variants(model, x, ctx, variants: list[str], result: dict, log) -> None:
    """CUDA-event median ms per guided step of each variant (a failure is logged and the others still run)."""
    preset = result["preset"]
    for variant in variants:
        try:
            t0 = time.time()
            # "+cudnn-benchmark": the same variant with cuDNN's per-shape algorithm search (a process-wide flag);
            # "+fast-ops": rdm_fast's kernels everywhere (ops mode "fast": none of auto mode's timed choices)
            base, _, extra = variant.partition("+")
            mode = "reference" if base.startswith("torch") else "fast" if extra == "fast-ops" else "auto"
            saved = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = extra == "cudnn-benchmark"
            try:
                with torch.inference_mode(), ops.use_mode(mode):
                    fn = step_fn(base, model, x, ctx)
                    ms = cuda_median_ms(lambda: fn(x, 500))
            finally:
                torch.backends.cudnn.benchmark = saved
            result[variant] = ms
            log(f"[{preset}] {variant}: {ms:.2f} ms/step (setup+timing {time.time() - t0:.0f} s)")
        except Exception:
            log(f"[{preset}] {variant} FAILED\n{traceback.format_exc()}")


def time_sampling(model, x, ctx, result: dict, log, steps: int = 20, fewer: int = 10) -> None:
    """CUDA-event median (3 runs after one warm-up) of a whole ``RDM.sample`` DDIM trajectory, per step: the
    guided steps (CUDA graph) plus the sampler's update kernel and the per-step Python, latents only. A second
    trajectory of ``fewer`` steps separates the cost of a step (the slope) from the trajectory's fixed cost (the
    intercept: caches refreshed, context prepared and copied into the kept graph)."""
    preset = result["preset"]
    try:
        scale = model.config.sampling.guidance_scale
        with torch.inference_mode(), ops.use_mode("auto"):
            ms = {n: cuda_median_ms(lambda n=n: model.sample(ctx, steps=n, guidance_scale=scale, x_T=x),
                                    reps=3, warmup=1) for n in (steps, fewer)}
        model.release_cuda_graph()
        per_step = (ms[steps] - ms[fewer]) / (steps - fewer)
        fixed = ms[steps] - steps * per_step
        result.update(sample_ms_per_step=ms[steps] / steps, sample_step_ms=per_step, sample_fixed_ms=fixed)
        log(f"[{preset}] RDM.sample, {steps} DDIM steps: {ms[steps] / steps:.2f} ms per step; from {fewer} and "
            f"{steps} steps: {per_step:.2f} ms per step + {fixed:.2f} ms per trajectory")
    except Exception:
        log(f"[{preset}] RDM.sample FAILED\n{traceback.format_exc()}")


def trajectory_parity(model, x, ctx, result: dict, log, images: int = 4, steps: int = 20) -> None:
    """Whole ``RDM.sample`` trajectories in bf16 (``model``) and fp16 (a copy) as sampling runs them (auto mode:
    the fast kernels and the CUDA graph), and their decoded images, against the float32 plain-PyTorch trajectory
    from the same noise (TF32 off), for ``images`` of the batch: the final latents' relative L2 error, the images'
    PSNR (range [-1, 1]), and whether they are finite and not blank (fewer images where the batch holds fewer).
    Results under ``trajectory_<dtype>_*``."""
    preset = result["preset"]
    x_T, c = x[:images].float(), ctx[:images]
    images = x_T.shape[0]
    scale = model.config.sampling.guidance_scale
    run = dict(steps=steps, sampler="ddim", eta=0.0, guidance_scale=scale, x_T=x_T)  # deterministic: no noise
    try:
        with torch.inference_mode():
            ref32 = copy.deepcopy(model).float()
            tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            try:
                with ops.use_mode("reference"):
                    z32 = ref32.sample(c.float(), **run)
                    img32 = ref32.decode(z32).float()
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            del ref32
    except Exception:
        log(f"[{preset}] trajectory parity FAILED (float32 reference)\n{traceback.format_exc()}")
        return
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        half = model if model.dtype == dtype else None
        try:
            with torch.inference_mode():
                if half is None:
                    half = copy.deepcopy(model).to(dtype)
                try:
                    with ops.use_mode("auto"):
                        z = half.sample(c, **run)
                        img = half.decode(z).float()
                finally:
                    half.release_cuda_graph()
            psnr = 10 * torch.log10(4.0 / (img - img32).pow(2).mean()).item()
            err, finite, std = rel_err(z, z32), bool(torch.isfinite(img).all()), float(img.std())
            result.update({f"trajectory_{name}_latent_err": err, f"trajectory_{name}_psnr_db": psnr,
                           f"trajectory_{name}_finite": finite, f"trajectory_{name}_blank": std < 1e-2})
            log(f"[{preset}] {steps}-step trajectory of {images} images, {name} fast vs fp32 reference from the "
                f"same noise: latents {err:.2e}, images {psnr:.1f} dB PSNR, finite {finite}, image std {std:.3f}")
        except Exception:
            log(f"[{preset}] trajectory parity FAILED ({name})\n{traceback.format_exc()}")
        del half
        torch.cuda.empty_cache()


def time_decode(model, z, result: dict, log) -> None:
    """The decoder's parity (bf16 ``RDM.decode`` and the NCHW plain-PyTorch decoder against the float32 plain
    decoder, TF32 off) and CUDA-event timings of both (median of 10 after 2 warm-ups); a failure of one part is
    logged and the other still runs."""
    preset, n = result["preset"], z.shape[0]

    def parity() -> tuple[float, float]:  # a function: its images and float32 model are freed however it ends
        with torch.inference_mode():
            with ops.use_mode("auto"):
                fast = decode_fn("rdm_fast", model, z)()
            with ops.use_mode("reference"):
                plain = decode_fn("torch-eager", model, z)()
                ref32 = copy.deepcopy(model).float()
                tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                try:
                    images32 = decode_fn("torch-eager", ref32, z)()
                finally:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        return rel_err(fast, images32), rel_err(plain, images32)

    try:
        result["decode_err_fast"], result["decode_err_ref_bf16"] = parity()
        log(f"[{preset}] decode of {n} latents, parity vs fp32: fast bf16 {result['decode_err_fast']:.2e}, "
            f"plain bf16 {result['decode_err_ref_bf16']:.2e}")
    except Exception:
        log(f"[{preset}] decode parity FAILED\n{traceback.format_exc()}")
    torch.cuda.empty_cache()
    for variant, mode in (("rdm_fast", "auto"), ("torch-eager", "reference")):
        try:
            with torch.inference_mode(), ops.use_mode(mode):
                fn = decode_fn(variant, model, z)
                result[f"decode {variant}"] = ms = cuda_median_ms(fn, reps=10, warmup=2)
            del fn
            log(f"[{preset}] decode of {n} latents, {variant}: {ms:.2f} ms")
        except Exception:
            log(f"[{preset}] decode {variant} FAILED\n{traceback.format_exc()}")
        torch.cuda.empty_cache()


def profile_step(model, x, ctx, images: int, out: Path, result: dict, log) -> None:
    """Per-kernel CUDA time of the fast eager step, grouped by kind (full list in kernels_<preset>.txt), then, on
    its own (a failure of one leaves the other measured), the device's idle time inside one graphed step call as
    the timings run it (copy-in, replay, clone of the output): the gaps between its kernels and around the
    graph's launch."""
    preset = result["preset"]
    try:
        with torch.inference_mode(), ops.use_mode("auto"):
            fn = step_fn("rdm_fast-eager", model, x, ctx)
            rows = profile_kernels(lambda: fn(x, 500))
            modules = module_times(lambda: fn(x, 500), model.unet)
            copies = copy_sites(lambda: fn(x, 500))
        by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for name, ms, n in rows:
            by_kind[kind_of(name)][0] += ms
            by_kind[kind_of(name)][1] += n
        total = sum(ms for _, ms, _ in rows)
        with open(out / f"kernels_{preset}.txt", "w") as f:
            f.write(f"{preset} {images} images bf16, fast eager step: {total:.2f} ms kernel time per step\n")
            for name, ms, n in rows:
                f.write(f"{ms:9.3f} ms {n:5d}x  [{kind_of(name)}] {name[:160]}\n")
            f.write("\nCUDA time per module kind and input size (C x H x W), per step:\n")
            for name, ms, n in modules:
                f.write(f"{ms:9.3f} ms {n:5d}x  {name}\n")
            f.write("\nCopy-like ATen ops of one step (shapes@strides, call site), calls:\n")
            for site, n in copies:
                f.write(f"{n:5d}x  {site}\n")
        log(f"[{preset}] kernel time per fast eager step: {total:.2f} ms")
        for kind, (ms, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
            log(f"    {kind:24s} {ms:8.2f} ms {n:5d} launches")
        for name, ms, n in rows[:12]:
            log(f"    {ms:8.3f} ms {n:4d}x {name[:110]}")
        result["kernel_ms"] = total
    except Exception:
        log(f"[{preset}] profile FAILED\n{traceback.format_exc()}")
    try:
        # captured after the profiler's first use above: replaying under the profiler a graph captured before
        # that first use is a known problem (pytorch/pytorch#75504, #100441)
        with torch.inference_mode(), ops.use_mode("auto"):
            graphed = step_fn("rdm_fast", model, x, ctx)
            idle = graph_idle(lambda: graphed(x, 500))
        log(f"[{preset}] graphed step call (copy-in, replay, clone): {idle['ops']:.0f} device operations over "
            f"{idle['span'] / 1000:.2f} ms, busy {idle['busy'] / 1000:.2f} ms, idle {idle['idle'] / 1000:.2f} ms in "
            f"{idle['gaps']:.0f} gaps (median {idle['median_gap']:.2f} us); longest: " + "; ".join(
                f"{g:.1f} us {a[:40]} -> {b[:40]}" for g, a, b in idle["longest"]))
        result.update(graph_span_ms=idle["span"] / 1000, graph_idle_ms=idle["idle"] / 1000)
    except Exception:
        log(f"[{preset}] graph idle time FAILED\n{traceback.format_exc()}")


def open_log(path: Path, header: str = ""):
    """A ``log(msg)`` that prints and appends to ``path``; logs the time, GPU and torch version first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logf = open(path, "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}" + (f", {header}" if header else ""))
    return log


def summary(results: list[dict], variants: list[str]) -> list[str]:
    """The closing table: ms per step of each variant and preset, and the graph step's speed-up over torch-eager."""
    lines = ["\npreset      images  " + "  ".join(f"{v[:14]:>14s}" for v in variants) + "   speed-up vs torch-eager"]
    for r in results:
        cells = "  ".join(f"{r[v]:11.2f} ms" if v in r else f"{'-':>14s}" for v in variants)
        ratio = f"{r['torch-eager'] / r['rdm_fast']:.2f}x" if "rdm_fast" in r and "torch-eager" in r else "-"
        lines.append(f"{r['preset']:10s} {r['images']:6d}  {cells}   {ratio}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="imagenet:64,rdm768:16,imagenet:4:timings,rdm768:1:timings",
                        help="preset:images[:timings] list; ':timings' skips parity and profile for that entry "
                        "(the small batches check that the fast path is not slower than plain PyTorch there)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    parser.add_argument("--variants", default="rdm_fast,rdm_fast-eager,torch-eager,rdm_fast+fast-ops",
                        help="comma-separated, from rdm_fast, rdm_fast-eager, torch-eager, torch-compile (the "
                        "peer through torch.compile: minutes to compile); a '+cudnn-benchmark' suffix times a "
                        "variant with torch.backends.cudnn.benchmark on, '+fast-ops' one with rdm_fast's kernels "
                        "forced (no timed choices between them and vendor kernels)")
    parser.add_argument("--timings-only", action="store_true", help="skip the parity check and the profile")
    args = parser.parse_args()
    # rdm_fast's INFO lines (the path each op takes, attention's measured choices) go to stderr: log.txt
    logging.basicConfig(format="%(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("rdm_fast").setLevel(logging.INFO)
    out = Path(args.out)
    log = open_log(out / "step.txt", f"backends {ops.available_backends()}")
    variants = args.variants.split(",")
    results: list[dict] = []
    # gpu_check.sh stops this script with SIGTERM at its time limit: leave through the finally below, so that the
    # table still holds what was measured (the lines above it were written as they came)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        checked = []
        for item in args.presets.split(","):
            preset, images, *flags = item.split(":")
            results.append({"preset": preset, "images": int(images)})
            checks = not args.timings_only and "timings" not in flags
            run_preset(results[-1], variants, log, checks=checks)
            if checks:
                checked.append(results[-1])
        for result in checked:
            diagnose_preset(result, out, log)
    finally:
        for line in summary(results, variants):
            log(line)


if __name__ == "__main__":
    main()

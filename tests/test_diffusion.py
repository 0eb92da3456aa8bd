"""Schedule and sampler checks against hand-computed numbers and toy models with known answers."""

import math

import numpy as np
import pytest
import torch

from rdm_fast import ops
from rdm_fast.diffusion import Schedule, guided, noised, sample_ddim, sample_plms
from rdm_fast.diffusion import schedule as schedule_module
from rdm_fast.ops.glue import PLMS_WEIGHTS

# Values computed by hand with 30-digit arithmetic (mpmath) from the schedule's definition.
HAND = {
    (0.0015, 0.0195): dict(beta1=0.0015078346820481534, acp1=0.99699442706997492, acp961=0.00029478561805828569,
                           acp981=0.00020195601706088692, acp999=0.00014230397519201785,
                           sigma_t1=0.027432087567638114),
    (0.0015, 0.015): dict(beta1=0.0015065003535212331, acp1=0.99699575939700905, acp961=0.0014221583989888851,
                          acp981=0.0010631672975800767, acp999=0.00081251847112864294,
                          sigma_t1=0.02742602659346764),
}


@pytest.mark.parametrize("ends", list(HAND))
def test_linear_schedule_matches_hand_computed_values(ends):
    s = Schedule.linear(*ends)
    h = HAND[ends]
    assert s.betas.dtype == torch.float64 and s.num_timesteps == 1000
    assert s.betas[0].item() == pytest.approx(ends[0], rel=1e-14)
    assert s.betas[-1].item() == pytest.approx(ends[1], rel=1e-14)
    assert s.betas[1].item() == pytest.approx(h["beta1"], rel=1e-13)
    acp = s.alphas_cumprod
    assert acp[0].item() == pytest.approx(1 - ends[0], rel=1e-15)
    for t in (1, 961, 981, 999):
        assert acp[t].item() == pytest.approx(h[f"acp{t}"], rel=1e-11)


def test_ddim_timesteps_and_coefficients():
    s = Schedule.linear(0.0015, 0.0195)
    assert s.ddim_timesteps(50).tolist() == list(range(1, 1000, 20))
    assert s.ddim_timesteps(100).tolist() == list(range(1, 1000, 10))
    c = s.ddim(50, eta=0.0)
    acp = s.alphas_cumprod
    assert len(c) == 50 and c.timesteps[0].item() == 981 and c.timesteps[-1].item() == 1
    assert c.alphas[0].item() == pytest.approx(HAND[(0.0015, 0.0195)]["acp981"], rel=1e-11)
    assert c.alphas_prev[0].item() == pytest.approx(HAND[(0.0015, 0.0195)]["acp961"], rel=1e-11)
    # the last step goes to alphā[0], not to 1
    assert c.alphas_prev[-1].item() == acp[0].item() != 1.0
    assert torch.all(c.sigmas == 0)
    c1 = s.ddim(50, eta=1.0)
    assert c1.sigmas[-1].item() == pytest.approx(HAND[(0.0015, 0.0195)]["sigma_t1"], rel=1e-11)
    c_half = s.ddim(50, eta=0.5)
    torch.testing.assert_close(c_half.sigmas, 0.5 * c1.sigmas)


def test_ddim_step_count_quirk_and_bounds():
    s = Schedule.linear(0.0015, 0.0195)
    assert s.ddim_timesteps(6).tolist() == list(range(1, 1000, 166))  # 7 steps for 6, as in the reference
    for bad in (0, 501, 1000):
        with pytest.raises(ValueError, match="steps must be between"):
            s.ddim_timesteps(bad)
    for past_end in (3, 9, 333):  # strides dividing 999 would reach t = 1000
        with pytest.raises(ValueError, match="past the last"):
            s.ddim_timesteps(past_end)
    with pytest.raises(ValueError, match="eta"):
        s.ddim(10, eta=-1.0)
    # other types: 2.5 steps gave float timesteps (and an IndexError in ddim), True one step, None or "0.5" as
    # eta a TypeError from a comparison
    for bad in (2.5, True, "10"):
        with pytest.raises(TypeError, match=f"steps must be an int, got {bad!r}"):
            s.ddim(bad)
    for bad in (None, "0.5", False):
        with pytest.raises(TypeError, match=f"eta must be a real number, got {bad!r}"):
            s.ddim(10, eta=bad)
    assert s.ddim(np.int64(10), eta=np.float32(0.5)).timesteps.tolist() == s.ddim(10, eta=0.5).timesteps.tolist()


def test_ddim_step_count_warning_once_per_count(caplog, monkeypatch):
    """A count that does not divide T is warned about once (sampling calls the schedule once per batch)."""
    monkeypatch.setattr(schedule_module, "_WARNED", set())
    s = Schedule.linear(0.0015, 0.0195)
    with caplog.at_level("WARNING", logger="rdm_fast.diffusion.schedule"):
        for _ in range(3):
            s.ddim(11)
        s.ddim(13)
        s.ddim(10)
    lines = [r.getMessage() for r in caplog.records]
    assert [m.split(";")[0] for m in lines] == ["11 DDIM steps requested", "13 DDIM steps requested"]


def test_ddim_update_formula():
    """The samplers' update (``ops.ddim_guided_step``) on one value, against the formula evaluated by hand."""
    x, eps = torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    a, ap, sig, z = 0.25, 0.64, 0.3, torch.tensor([-1.0], dtype=torch.float64)
    x_prev, x0 = ops.ddim_guided_step(x, None, eps, 1.0, a, ap, sig, z)
    x0_hand = (2.0 - math.sqrt(0.75) * 0.5) / 0.5
    assert x0.item() == pytest.approx(x0_hand, rel=1e-14)
    assert x_prev.item() == pytest.approx(0.8 * x0_hand + math.sqrt(1 - 0.64 - 0.09) * 0.5 - 0.3, rel=1e-14)


def test_plms_coefficients():
    """Adams-Bashforth weights of the current eps and past ones (newest first), and the update that uses them: with
    a_t = 1 and x = 0 the step returns sqrt(1 - a_prev) = 0.5 times the combined eps."""
    assert PLMS_WEIGHTS == {0: (1.0,), 1: (3 / 2, -1 / 2), 2: (23 / 12, -16 / 12, 5 / 12),
                            3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    e = [torch.tensor([float(v)], dtype=torch.float64) for v in (1.0, 10.0, 100.0, 1000.0)]  # e[-1] newest
    zero = torch.zeros(1, dtype=torch.float64)
    combined = {0: 1000.0, 1: (3 * 1000 - 100) / 2, 2: (23 * 1000 - 16 * 100 + 5 * 10) / 12,
                3: (55 * 1000 - 59 * 100 + 37 * 10 - 9 * 1) / 24}
    for n, want in combined.items():
        x_prev, _, eps = ops.plms_guided_step(zero, None, e[3], 1.0, e[3 - n:3], 1.0, 0.75)
        assert x_prev.item() == pytest.approx(0.5 * want, rel=1e-14) and eps.item() == 1000.0


def point_mass_eps(schedule: Schedule, c: torch.Tensor):
    """The exact eps-predictor when every data point equals c: eps = (x - sqrt(a) c) / sqrt(1 - a)."""
    acp = schedule.alphas_cumprod

    def eps_fn(x, t):
        a = acp[t].item()
        return (x - a ** 0.5 * c) / (1 - a) ** 0.5

    return eps_fn


@pytest.mark.parametrize("sampler,steps", [("ddim", 1), ("ddim", 7), ("ddim", 50), ("plms", 2), ("plms", 7),
                                           ("plms", 50)])
def test_samplers_are_exact_on_a_point_mass(sampler, steps):
    """With the exact eps of a point mass, eps is constant along a deterministic trajectory, so the result is
    known in closed form: sqrt(alphā_0) c + sqrt(1 - alphā_0) eps_T (the last step lands on t = 0).
    (One-step PLMS is excluded: its "next" timestep is the same one, as in the reference.)"""
    s = Schedule.linear(0.0015, 0.0195)
    torch.manual_seed(0)
    c = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x_T = torch.randn_like(c)
    eps_fn = point_mass_eps(s, c)
    coeffs = s.ddim(steps)
    out = (sample_ddim if sampler == "ddim" else sample_plms)(eps_fn, x_T, coeffs)
    a_T, a_0 = s.alphas_cumprod[coeffs.timesteps[0]].item(), s.alphas_cumprod[0].item()
    eps_T = (x_T - a_T ** 0.5 * c) / (1 - a_T) ** 0.5
    torch.testing.assert_close(out, a_0 ** 0.5 * c + (1 - a_0) ** 0.5 * eps_T, rtol=1e-9, atol=1e-9)


def test_plms_calls_and_first_step_average():
    """PLMS makes steps + 1 model calls; its first step evaluates eps at the next timestep too."""
    s = Schedule.linear(0.0015, 0.0195)
    calls = []

    def eps_fn(x, t):
        calls.append(t)
        return torch.full_like(x, float(t) / 1000)

    sample_plms(eps_fn, torch.zeros(1, 1, 2, 2, dtype=torch.float64), s.ddim(10))
    assert calls[:3] == [901, 801, 801] and len(calls) == 11 and calls[-1] == 1


@pytest.mark.parametrize("steps", [4, 10])
def test_plms_matches_hand_unrolled_steps(steps):
    """PLMS against an independent unrolling with a nonlinear toy eps: 4 steps take every branch once
    (t = 751, 501, 251, 1); 10 steps check that the history keeps the newest three eps."""
    s = Schedule.linear(0.0015, 0.0195)
    coeffs = s.ddim(steps)
    acp = s.alphas_cumprod

    def eps_fn(x, t):
        return torch.tanh(x) * (t / 1000.0) + 0.1

    x = torch.tensor([0.7, -1.3], dtype=torch.float64)
    ts = coeffs.timesteps.tolist()
    prevs = [acp[ts[i + 1]].item() if i + 1 < len(ts) else acp[0].item() for i in range(len(ts))]

    def step(x, e, i):
        a, ap = acp[ts[i]].item(), prevs[i]
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        return math.sqrt(ap) * x0 + math.sqrt(1 - ap) * e

    hist, y = [], x.clone()
    for i in range(len(ts)):
        e = eps_fn(y, ts[i])
        if i == 0:
            e2 = eps_fn(step(y, e, 0), ts[1])
            ep = (e + e2) / 2
        elif i == 1:
            ep = (3 * e - hist[-1]) / 2
        elif i == 2:
            ep = (23 * e - 16 * hist[-1] + 5 * hist[-2]) / 12
        else:
            ep = (55 * e - 59 * hist[-1] + 37 * hist[-2] - 9 * hist[-3]) / 24
        y = step(y, ep, i)
        hist.append(e)
    torch.testing.assert_close(sample_plms(eps_fn, x, coeffs), y, rtol=1e-12, atol=1e-12)


def test_guidance_combines_one_batched_call_against_zero_context():
    seen = []

    def model(x, t, ctx):
        seen.append((x.shape[0], t.tolist(), ctx.clone()))
        return x * 0 + ctx.sum(dim=(1, 2)).view(-1, 1, 1, 1)

    ctx = torch.arange(1.0, 7.0).view(2, 3, 1)
    eps = guided(model, ctx, scale=3.0)(torch.zeros(2, 1, 2, 2), 41)
    assert len(seen) == 1 and seen[0][0] == 4 and seen[0][1] == [41] * 4
    assert torch.all(seen[0][2][:2] == 0) and torch.equal(seen[0][2][2:], ctx)
    # eps_u = 0, eps_c = per-sample context sums (6, 15): 0 + 3 * (eps_c - 0)
    assert eps[:, 0, 0, 0].tolist() == [18.0, 45.0]
    seen.clear()
    guided(model, ctx, scale=1.0)(torch.zeros(2, 1, 2, 2), 41)
    assert seen[0][0] == 2  # no unconditional half without guidance


def test_ddim_with_eta_is_seeded_and_noisy():
    s = Schedule.linear(0.0015, 0.0195)
    c = torch.zeros(1, 1, 4, 4)
    eps_fn = point_mass_eps(s, c)
    x_T = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [sample_ddim(eps_fn, x_T, s.ddim(20, eta=1.0), generator=torch.Generator().manual_seed(k))
            for k in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert not torch.allclose(runs[0], sample_ddim(eps_fn, x_T, s.ddim(20)))


@pytest.mark.parametrize("steps,eta", [(10, 1.0), (25, 0.5)])
def test_ddim_with_eta_matches_an_unrolled_loop(steps, eta):
    """The whole DDIM loop with eta > 0 against a float64 unrolling of the update from the formulas, fed the
    same noise: sample_ddim draws each step's noise in x's shape from the generator, float32."""
    s = Schedule.linear(0.0015, 0.0195)
    acp = s.alphas_cumprod.tolist()

    def eps_fn(x, t):
        return torch.tanh(x) * (t / 1000.0) + 0.05 * torch.cos(3 * x)

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = sample_ddim(eps_fn, x_T, s.ddim(steps, eta), generator=torch.Generator().manual_seed(7))
    g, x = torch.Generator().manual_seed(7), x_T.double()
    ts = list(range(1, 1000, 1000 // steps))[::-1]
    for i, t in enumerate(ts):
        a, a_prev = acp[t], acp[ts[i + 1]] if i + 1 < len(ts) else acp[0]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        e = eps_fn(x, t)
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * e + sigma * torch.randn(
            x.shape, generator=g).double()
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps,bound", [(50, 1.0453), (2, 1.0001), (500, 1.4094)])
def test_eta_beyond_the_real_bound_is_refused(steps, bound):
    """Past eta's bound 1 - alphā_prev - sigma² < 0 and the update's square root turns complex: refused, naming
    the bound (rounded down, so the bound itself is accepted with real coefficients)."""
    s = Schedule.linear(0.0015, 0.0195)
    c = s.ddim(steps, bound)
    assert bool((1 - c.alphas_prev - c.sigmas ** 2 >= 0).all())
    for eta in (bound + 0.001, 3.0, math.inf):
        with pytest.raises(ValueError, match=rf"eta = .* is too large for {steps} steps .* needs eta <= {bound}$"):
            s.ddim(steps, eta)
    with pytest.raises(ValueError, match="eta must be >= 0, got nan"):
        s.ddim(steps, math.nan)
    s.ddim(steps, 1.0)  # the DDPM variance always fits


@pytest.mark.parametrize("steps,eta", [(50, 0.0), (100, 1.0), (7, 0.5)])
def test_schedule_and_updates_match_the_independent_oracle(steps, eta):
    """The schedule, DDIM coefficients, DDIM update and PLMS combination against tests/oracle.py's pure-Python
    float64 versions (written from the released models' conventions only)."""
    import oracle

    sched = Schedule.linear(0.0015, 0.0195)
    betas = oracle.make_betas(0.0015, 0.0195)
    torch.testing.assert_close(sched.betas, betas, rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.alphas_cumprod, oracle.make_alphas_cumprod(betas), rtol=1e-12, atol=0)
    c = sched.ddim(steps, eta)
    timesteps = oracle.ddim_timesteps(steps)
    assert c.timesteps.tolist() == timesteps[::-1]
    a, a_prev, sigma = oracle.ddim_coefficients(oracle.make_alphas_cumprod(betas), timesteps, eta)
    for ours, theirs in ((c.alphas, a), (c.alphas_prev, a_prev), (c.sigmas, sigma)):
        torch.testing.assert_close(ours, theirs.flip(0), rtol=1e-12, atol=1e-15)
    g = torch.Generator().manual_seed(steps)
    x, eps, noise, *hist = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(6))
    i = len(c) // 2
    args = (float(c.alphas[i]), float(c.alphas_prev[i]), float(c.sigmas[i]))
    for ours, theirs in zip(ops.ddim_guided_step(x, None, eps, 1.0, *args, noise=noise),
                            oracle.ddim_step(x, eps, *args, noise), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for n in (1, 2, 3):  # the Adams-Bashforth combination, then the update with it
        ours = ops.plms_guided_step(x, None, eps, 1.0, hist[:n], *args[:2])[0]
        theirs = oracle.ddim_step(x, oracle.plms_eps(eps, hist[:n]), *args[:2], 0.0)[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_per_sample_generators_draw_each_row_from_its_own():
    """A sequence of generators draws row i from generator i: the same rows whatever batch they are in."""
    from rdm_fast.diffusion.samplers import draw_noise

    def gens(ids):
        return [torch.Generator().manual_seed(100 + i) for i in ids]

    whole = draw_noise((4, 2, 3), gens(range(4)), torch.device("cpu"))
    parts = [draw_noise((2, 2, 3), gens(ids), torch.device("cpu")) for ids in ((0, 1), (2, 3))]
    assert torch.equal(whole, torch.cat(parts))
    assert torch.equal(whole[2], torch.randn(2, 3, generator=torch.Generator().manual_seed(102)))
    with pytest.raises(ValueError, match="one per sample"):
        draw_noise((3, 2), gens(range(2)), torch.device("cpu"))
    s = Schedule.linear(0.0015, 0.0195)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    runs = [sample_ddim(lambda x, t: 0.1 * x, x[ids], s.ddim(5, eta=1.0), generator=gens(ids))
            for ids in ([0, 1, 2, 3], [2, 3])]
    torch.testing.assert_close(runs[0][2:], runs[1], rtol=1e-12, atol=1e-12)


def test_numpy_generators_draw_rows_and_step_noise():
    """NumPy generators (the command line's per-sample streams) work as torch ones do: row i from generator i in
    float32, the same whatever the batch, also for the noise of eta > 0; a mixed or wrong list is named."""
    import numpy as np
    from rdm_fast.diffusion.samplers import draw_noise

    def gens(ids):
        return [np.random.default_rng(np.random.SeedSequence([3, i])) for i in ids]

    whole = draw_noise((4, 2, 3), gens(range(4)), torch.device("cpu"))
    assert whole.dtype == torch.float32
    assert torch.equal(whole[2], torch.from_numpy(gens([2])[0].standard_normal((2, 3), dtype=np.float32)))
    assert torch.equal(whole[2:], draw_noise((2, 2, 3), gens([2, 3]), torch.device("cpu")))
    assert draw_noise((1, 2), gens([0]), torch.device("cpu"), torch.float16).dtype == torch.float16
    mixed = gens([0]) + [torch.Generator().manual_seed(1)]
    assert draw_noise((2, 3), mixed, torch.device("cpu")).shape == (2, 3)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        draw_noise((2, 3), gens([0]) + [np.random.RandomState(0)], torch.device("cpu"))
    s = Schedule.linear(0.0015, 0.0195)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    runs = [sample_ddim(lambda x, t: 0.1 * x, x[ids], s.ddim(5, eta=1.0), generator=gens(ids))
            for ids in ([0, 1, 2, 3], [2, 3])]
    torch.testing.assert_close(runs[0][2:], runs[1], rtol=1e-12, atol=1e-12)


def test_sampling_settings_name_the_argument_and_take_integral_steps():
    import numpy as np
    from rdm_fast.config import SamplingDefaults
    run = SamplingDefaults().resolve(steps=np.int64(4), eta=np.float32(0.5), guidance_scale=np.float64(3))
    assert run.steps == 4 and type(run.steps) is int
    for kwargs, name in (({"eta": "0.5"}, "eta"), ({"guidance_scale": "5"}, "guidance_scale"),
                         ({"guidance_scale": None, "eta": [0]}, "eta")):
        with pytest.raises(TypeError, match=f"{name} must be a real number"):
            SamplingDefaults().resolve(**kwargs)
    with pytest.raises(TypeError, match="steps must be an int"):
        SamplingDefaults().resolve(steps=2.0)


@pytest.mark.parametrize("args,name", [
    ((0.02, 0.001, 1000), "linear_start"),      # start > end: betas would shrink with t
    ((0.0015, 0.0195, 0), "timesteps"),         # an empty schedule
    ((0.0015, 0.0195, -3), "timesteps"),
    ((0.0015, 0.0195, 10.5), "timesteps"),
    ((-0.1, 0.02, 1000), "linear_start"),       # sqrt of a negative: a complex linspace error before
    ((0.0015, -0.02, 1000), "linear_end"),
    ((0.0015, 1.0, 1000), "linear_end"),        # beta = 1 zeroes alphas_cumprod
    ((float("nan"), 0.02, 1000), "linear_start"),
])
def test_linear_refuses_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name) as e:
        Schedule.linear(*args)
    assert "\n" not in str(e.value)


def test_linear_still_builds_the_released_schedule():
    s = Schedule.linear(0.0015, 0.0195, 1000)
    assert s.num_timesteps == 1000
    torch.testing.assert_close(s.betas[[0, -1]], torch.tensor([0.0015, 0.0195], dtype=torch.float64))
    assert Schedule.linear(0.01, 0.01, 1).num_timesteps == 1  # constant and one-step schedules stay allowed


def test_schedules_and_noised_check_their_inputs():
    """From a Python API audit: betas above 1 gave negative alpha-bars that the samplers took; a list or NumPy
    betas failed inside cumprod; a NumPy t failed with an AttributeError."""
    with pytest.raises(ValueError, match=r"betas must lie in \[0, 1\), got values from 0.3 to 1.5"):
        Schedule(torch.tensor([0.5, 1.5, 0.3], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"betas must be a non-empty \(T,\) array, got shape \(2, 2\)"):
        Schedule(torch.full((2, 2), 0.1))
    with pytest.raises(TypeError, match="betas must be a .* array of numbers, got str"):
        Schedule("0.1")
    with pytest.raises(ValueError, match=r"betas must lie in \[0, 1\), got NaN"):
        Schedule([0.1, float("nan")])
    from_list = Schedule([0.1, 0.2])
    assert from_list.betas.dtype == torch.float64 and torch.equal(from_list.betas, Schedule(np.array([0.1, 0.2])).betas)
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="noised: t must be a torch.Tensor, got ndarray"):
        noised(Schedule.linear(0.0015, 0.0195), x, np.array([0, 1]), x)

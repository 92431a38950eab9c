"""fedsim.dp: clipping/noise math on the torch path, noise statistics and streams, Opacus accounting."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from opacus.accountants.utils import get_noise_multiplier

from fedsim.dp import (RDP_ORDERS, DPConfig, clip_and_noise, epsilon_spent, max_poisson_batch, noise_multiplier_for,
                       validate_dp)
from fedsim.rng import torch_generator


def keys(R, tag=0):
    return [(7, "dp-noise", tag, r) for r in range(R)]


@st.composite
def grad_batches(draw):
    """Random per-sample grads [R, b, D] spanning 6 orders of magnitude, with some rows zeroed (masked)."""
    R, b, D = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = 10 ** draw(st.floats(-3, 3))
    grads = torch.randn(R, b, D, generator=g) * scale
    grads *= (torch.rand(R, b, 1, generator=g) > 0.3)
    return grads, scale


clip_norms = st.floats(1e-3, 1e3)


@settings(max_examples=40, deadline=None)
@given(grad_batches(), clip_norms)
def test_each_clipped_sample_within_bound(batch, C):
    grads, _ = batch
    R, b, D = grads.shape
    for r in range(R):
        for n in range(b):
            one = clip_and_noise(grads[r:r + 1, n:n + 1], C, 0.0, 1.0, keys(1))
            # measure in float64 so the check is not fooled by float32 rounding of the norm itself
            assert one.double().norm() <= C * (1 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(grad_batches(), st.floats(0.5, 64))
def test_huge_clip_norm_is_plain_mean(batch, B):
    grads, scale = batch
    out = clip_and_noise(grads, 1e12, 0.0, B, keys(grads.shape[0]))
    torch.testing.assert_close(out, grads.sum(1) / B, rtol=1e-5, atol=1e-6 * scale)


@settings(max_examples=40, deadline=None)
@given(grad_batches(), clip_norms)
def test_sigma_zero_is_deterministic_and_key_free(batch, C):
    grads, _ = batch
    R = grads.shape[0]
    a = clip_and_noise(grads, C, 0.0, 3.0, keys(R, 0))
    assert torch.equal(a, clip_and_noise(grads, C, 0.0, 3.0, keys(R, 0)))
    assert torch.equal(a, clip_and_noise(grads, C, 0.0, 3.0, keys(R, 1)))


@settings(max_examples=40, deadline=None)
@given(grad_batches(), clip_norms)
def test_zero_rows_contribute_nothing(batch, C):
    grads, scale = batch
    R, b, D = grads.shape
    assert torch.equal(clip_and_noise(torch.zeros(R, b, D), C, 0.0, 2.0, keys(R)), torch.zeros(R, D))
    padded = torch.cat([grads, torch.zeros(R, 3, D)], dim=1)  # Poisson padding slots
    torch.testing.assert_close(clip_and_noise(padded, C, 0.0, 2.0, keys(R)),
                               clip_and_noise(grads, C, 0.0, 2.0, keys(R)), rtol=1e-6, atol=1e-7 * scale)


@settings(max_examples=20, deadline=None)
@given(grad_batches(), clip_norms)
def test_sq_norms_and_per_replica_params(batch, C):
    grads, _ = batch
    R = grads.shape[0]
    Cs, Bs, sig = C * torch.linspace(0.5, 2, R), torch.linspace(1, 9, R), torch.linspace(0, 1.5, R)
    out = clip_and_noise(grads, Cs, sig, Bs, keys(R), sq_norms=grads.square().sum(-1))
    for r in range(R):  # a [R] parameter tensor is the same as calling each replica with its own floats
        one = clip_and_noise(grads[r:r + 1], Cs[r].item(), sig[r].item(), Bs[r].item(), keys(R)[r:r + 1])
        torch.testing.assert_close(out[r:r + 1], one, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- noise

R, D, SIGMA, C, B = 6, 20000, 1.3, 0.7, 5.0


def test_noise_is_exactly_the_keyed_torch_stream():
    out = clip_and_noise(torch.zeros(R, 4, D), C, SIGMA, B, keys(R))
    for r, k in enumerate(keys(R)):
        assert torch.equal(out[r], torch.randn(D, generator=torch_generator(*k)) * SIGMA * C / B)


def test_noise_statistics_and_independence():
    out = clip_and_noise(torch.zeros(R, 4, D), C, SIGMA, B, keys(R)).double()
    s, n = SIGMA * C / B, out.numel()
    # n iid N(0, s^2): the sample mean has std s/sqrt(n), the sample std has relative std ~1/sqrt(2n);
    # 5 of those is a ~6e-7 false-alarm rate (and the draw is seeded, so it is deterministic anyway).
    assert abs(out.mean()) < 5 * s / math.sqrt(n)
    assert abs(out.std() / s - 1) < 5 / math.sqrt(2 * n)
    # Independent replicas: each pairwise sample correlation is ~N(0, 1/D); 5/sqrt(D) over 15 pairs.
    corr = torch.corrcoef(out)
    off = corr[~torch.eye(R, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(D)


def test_noise_keys_select_streams():
    z = torch.zeros(2, 1, 1000)
    a = clip_and_noise(z, C, SIGMA, B, keys(2, 0))
    assert torch.equal(a, clip_and_noise(z, C, SIGMA, B, keys(2, 0)))
    assert not (a == clip_and_noise(z, C, SIGMA, B, keys(2, 1))).any()
    assert not (a[0] == a[1]).any()


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        clip_and_noise(torch.zeros(1, 1, 3), C, 0.0, B, keys(1), backend="cuda")


# -------------------------------------------------------------------------------------------- accounting

def test_noise_multiplier_matches_opacus_and_spends_target():
    sigma = noise_multiplier_for(3, 1e-5, 0.01, 1000)
    assert noise_multiplier_for(3, 1e-5, 0.01, 1000) == sigma and noise_multiplier_for.cache_info().hits >= 1
    assert sigma == get_noise_multiplier(target_epsilon=3, target_delta=1e-5, sample_rate=0.01, steps=1000,
                                         accountant="rdp", alphas=list(RDP_ORDERS))
    eps = epsilon_spent(sigma, 0.01, 1000, 1e-5, "rdp")
    assert 3 - 0.011 <= eps <= 3  # opacus' binary search stops within epsilon_tolerance=0.01 below target
    assert epsilon_spent(sigma * 1.1, 0.01, 1000, 1e-5, "rdp") < eps  # more noise, less privacy spent


@pytest.mark.parametrize("q,steps,sigma", [(0.1, 3, 6.0), (0.02, 30, 3.0), (0.3, 3, 12.0)])
def test_rdp_orders_wide_enough_for_few_large_steps(q, steps, sigma):
    """With few steps and a large sigma (what calibrating a federated run's few large steps evaluates
    while it searches sigma) Opacus' default orders (up to 63) end at the optimum and overstate epsilon;
    fedsim's grid finds the optimum inside (no warning) and a smaller epsilon, still an upper bound on
    the near-exact PRV accountant's."""
    import warnings
    from opacus.accountants import RDPAccountant
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    with pytest.warns(UserWarning, match="largest alpha"):
        default = acc.get_epsilon(1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # the warning would now fail the test
        ours = epsilon_spent(sigma, q, steps, 1e-5, "rdp")
    prv = epsilon_spent(sigma, q, steps, 1e-5, "prv")
    assert prv < ours < default


def test_calibrating_a_few_step_run_warns_nothing():
    import warnings
    noise_multiplier_for.cache_clear()            # calibrate now, not from an earlier test's call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigma = noise_multiplier_for(1.0, 1e-5, 0.1, 9)
    assert 1.0 - 0.011 <= epsilon_spent(sigma, 0.1, 9, 1e-5, "rdp") <= 1.0


def test_prv_accountant():
    sigma = noise_multiplier_for(3, 1e-5, 0.01, 100, accountant="prv")
    assert 3 - 0.05 <= epsilon_spent(sigma, 0.01, 100, 1e-5, "prv") <= 3
    assert sigma < noise_multiplier_for(3, 1e-5, 0.01, 100, accountant="rdp")  # PRV is tighter than RDP


def test_edge_cases_of_spending():
    assert epsilon_spent(1.0, 0.01, 0, 1e-5) == 0.0
    assert epsilon_spent(0.0, 0.01, 10, 1e-5) == math.inf


@pytest.mark.parametrize("args, match", [
    ((0, 1e-5, 1.0, "rdp"), "epsilon"),
    ((-1, 1e-5, 1.0, "rdp"), "epsilon"),
    ((math.nan, 1e-5, 1.0, "rdp"), "epsilon"),
    ((-math.inf, 1e-5, 1.0, "rdp"), "epsilon"),
    ((math.inf, 0, 1.0, "rdp"), "delta"),              # clip only still checks the rest of the schedule
    ((math.inf, 1e-5, 0.0, "rdp"), "max_grad_norm"),
    ((3, 0, 1.0, "rdp"), "delta"),
    ((3, 1.0, 1.0, "rdp"), "delta"),
    ((3, 1e-5, 0.0, "rdp"), "max_grad_norm"),
    ((3, 1e-5, 1.0, "gdp"), "accountant"),
])
def test_validate_dp_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        validate_dp(*args)
    with pytest.raises(ValueError, match=match):
        DPConfig(*args).validate()


def test_non_private_config_is_valid():
    cfg = DPConfig().validate()
    assert not cfg.private and DPConfig(epsilon=8).validate().private
    with pytest.raises(ValueError, match="max_batch_factor"):
        DPConfig(epsilon=8, max_batch_factor=0).validate()


@pytest.mark.parametrize("q, steps", [(1.0, 10000), (0.5, 1000)])
def test_unreachable_epsilon_says_how_to_fix(q, steps):
    with pytest.raises(ValueError, match="raise epsilon, lower q.*lower the number of steps"):
        noise_multiplier_for(0.01, 1e-5, q, steps)


def test_bad_schedule():
    with pytest.raises(ValueError, match="sample rate"):
        noise_multiplier_for(3, 1e-5, 0.0, 100)
    with pytest.raises(ValueError, match="steps"):
        noise_multiplier_for(3, 1e-5, 0.1, -1)


@pytest.mark.parametrize("mu", [0.5, 1, 4, 16, 64, 256, 4096])
@pytest.mark.parametrize("k", [2.0, 3.0, 4.0])
def test_max_poisson_batch_tail_bound(mu, k):
    from scipy.stats import binom
    m = max_poisson_batch(mu, k)
    assert m >= mu + k * math.sqrt(mu)
    n = 100_000  # batch size ~ Binomial(n, mu/n); the documented Bernstein bound must hold
    assert binom.sf(m, n, mu / n) <= math.exp(-k * k / 2)


def test_per_group_clipping_clips_each_group_to_its_share_and_keeps_the_noise():
    """Head and adapters clipped separately to C sqrt(share) and C sqrt(1 - share): every clipped sample's
    norm stays <= C (so sigma * C noise and the accounting are unchanged), and a head with a huge gradient
    no longer shrinks the adapters' part."""
    from fedsim.dp import clip_groups
    g = torch.Generator().manual_seed(0)
    R, b, D_a, D_h = 2, 5, 6, 3
    grads = torch.randn(R, b, D_a + D_h, generator=g)
    grads[:, :, D_a:] *= 50.0                                  # the head dominates, as measured under DP
    groups = clip_groups({"l.lora_A": (0, 4), "l.lora_B": (4, 6), "classifier.weight": (6, 9)},
                         {"classifier.weight"}, 0.25)
    assert groups == (((0, 6), 0.75), ((6, 9), 0.25))
    C, keys = 2.0, [(0, "noise", 0, r, 0) for r in range(R)]
    per_group = clip_and_noise(grads, C, 0.0, 1.0, keys, groups=groups)
    joint = clip_and_noise(grads, C, 0.0, 1.0, keys)
    for r in range(R):
        for (lo, hi), share in groups:
            part = grads[r, :, lo:hi]
            factor = (C * share ** 0.5 / (part.norm(dim=1) + 1e-6)).clamp(max=1.0)
            torch.testing.assert_close(per_group[r, lo:hi], (factor[:, None] * part).sum(0))
    assert per_group[:, :D_a].norm() > 10 * joint[:, :D_a].norm()  # adapters keep their signal
    noisy_g = clip_and_noise(grads, C, 0.7, 1.0, keys, groups=groups)
    noisy_j = clip_and_noise(grads, C, 0.7, 1.0, keys)
    torch.testing.assert_close(noisy_g - per_group, noisy_j - joint)  # the same noise: sigma * C * z
    # sq_norms per group give the same result as norms computed here
    sq = torch.stack([grads[:, :, lo:hi].pow(2).sum(-1) for (lo, hi), _ in groups], -1)
    torch.testing.assert_close(clip_and_noise(grads, C, 0.0, 1.0, keys, sq_norms=sq, groups=groups), per_group)


def test_clip_groups_edge_cases():
    from fedsim.dp import clip_groups
    assert clip_groups({"a": (0, 2), "h": (2, 3)}, {"h"}, None) is None          # joint clipping
    assert clip_groups({"a": (0, 2)}, {"h"}, 0.3) == (((0, 2), 1.0),)            # frozen head: one group
    with pytest.raises(ValueError, match="contiguous"):
        clip_groups({"a": (0, 2), "h": (2, 3), "b": (3, 4)}, {"h"}, 0.3)


# ------------------------------------------------------------------------- epsilon = inf: clip only (sigma 0)

def _refuse_accountants(monkeypatch):
    """From now on any Opacus accountant call (calibration or spending) fails the test."""
    import opacus.accountants
    import opacus.accountants.utils

    def refuse(*a, **k):
        raise AssertionError("an accountant was asked about a clip-only (epsilon inf) federation")
    monkeypatch.setattr(opacus.accountants.utils, "get_noise_multiplier", refuse)
    monkeypatch.setattr(opacus.accountants, "create_accountant", refuse)


@pytest.fixture
def no_accountant(monkeypatch):
    _refuse_accountants(monkeypatch)


def test_epsilon_inf_is_sigma_zero_without_an_accountant(no_accountant):
    from fedsim.dp import clip_only, json_epsilon
    assert noise_multiplier_for(math.inf, 1e-5, 0.05, 100) == 0.0
    assert noise_multiplier_for(math.inf, 1e-5, 1.0, 10, accountant="prv") == 0.0
    assert epsilon_spent(0.0, 0.05, 100, 1e-5) == math.inf
    cfg = DPConfig(epsilon=math.inf).validate()
    assert cfg.private and cfg.clip_only and not DPConfig(epsilon=3).clip_only and not DPConfig().clip_only
    assert clip_only(math.inf) and not clip_only(None) and not clip_only(3.0)
    assert json_epsilon(math.inf) == "inf" and json_epsilon(3.0) == 3.0 and json_epsilon(None) is None


def test_clip_only_update_is_the_clipped_average_and_clipping_binds(make_model, sst2_small, no_accountant):
    """epsilon inf through the engine: q = 1 (every sample every step, expected batch = client size = b), two
    clients, two SGD steps. The update equals the sequential reference's plain clip-and-average at sigma 0;
    with a clip that never binds it is the non-private update (same samples, only their summation order
    differs); with C = 0.05 it is far from it."""
    import numpy as np
    from fedsim.engine import DPSetup
    from fedsim.reference import run_reference
    from tests.helpers import assert_same, make_engine, reference_cfg, rel_err
    parts = [np.arange(0, 8), np.arange(8, 16)]
    opt, QV, b, K = {"name": "sgd", "lr": 0.5, "momentum": 0.0}, ["query", "value"], 8, 2
    sigma = noise_multiplier_for(math.inf, 1e-5, 1.0, K)       # what fedsim.run gives an inf federation
    assert sigma == 0.0

    def final(dp, sigmas=None):
        eng = make_engine(make_model, sst2_small, [parts], seeds=[0], optimizer=opt, targets=QV, fraction=1.0,
                          K=K, b=b, dp=dp, sigmas=sigmas)
        init = {k: v[0].clone() for k, v in eng.global_state.items()}
        eng.run_round()
        return init, {k: v[0] for k, v in eng.global_state.items()}

    _, plain = final(None)
    flat = lambda state: torch.cat([state[k].flatten() for k in sorted(state)])   # noqa: E731
    for C in (1e6, 0.05):
        init, got = final(DPSetup(max_grad_norm=C, sample_rate=1.0, max_batch=b), [sigma])
        ref, _ = run_reference(make_model, sst2_small, parts, init,
                               reference_cfg(opt, QV, 1.0, K=K, b=b, rounds=1, dp_max_grad_norm=C,
                                             dp_noise_multiplier=0.0, dp_sample_rate=1.0, dp_max_batch=b))
        assert_same(got, ref)
        gap = rel_err(flat(got) - flat(init), flat(plain) - flat(init))
        if C == 1e6:
            assert gap < 1e-4, f"a clip that never binds changed the update ({gap:.1e})"
        else:
            assert gap > 0.1, f"clipping at C = 0.05 barely changed the update ({gap:.1e})"


SMALL_RUN = dict(num_hidden_layers=2, max_length=32, train_subsample=200, eval_subsample=60, num_clients=4,
                 client_fraction=0.5, rounds=2, local_steps=2, batch_size=8, replica_chunk=2)


def _strict_json(text):
    import json

    def refuse(constant):
        raise AssertionError(f"not strict JSON: bare {constant}")
    return json.loads(text, parse_constant=refuse)


def test_clip_only_in_an_epsilon_sweep_equals_itself_alone_and_reads_back(tmp_path, monkeypatch):
    """sweep {dp.epsilon: [.inf, 3]} x seeds [0, 1] through fedsim.run: the (seed 1, inf) federation equals the
    same federation run alone (dp.epsilon inf, asking no accountant) bit for bit (chunks of one federation's
    replicas), its files are strict JSON that mark it clip only, and the figures loader labels and orders it."""
    import yaml
    from fedsim.config import load_config
    from fedsim.run import run
    from scripts.figures.load import CLIP_ONLY_LABEL, federation_frame
    from scripts.figures.style import privacy_order
    shared = run(load_config(overrides=dict(SMALL_RUN, seeds=[0, 1], sweep={"dp.epsilon": [math.inf, 3.0]})),
                 tmp_path / "shared", progress=False)
    _refuse_accountants(monkeypatch)
    solo = run(load_config(overrides=dict(SMALL_RUN, seeds=[1], **{"dp.epsilon": "inf"})), tmp_path / "solo",
               progress=False)
    assert _strict_json((tmp_path / "shared" / "summary.json").read_text()) == shared
    for d in ("shared", "solo"):
        for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines():
            _strict_json(line)
    feds = shared["federations"]
    assert [(f["seed"], f["variant"]) for f in feds] == [(s, {"dp.epsilon": e}) for s in (0, 1)
                                                         for e in ("inf", 3.0)]
    f = 2                                                       # seed 1, epsilon inf
    for key in ("final", "final_loss", "noise_multiplier", "target_epsilon", "epsilon_spent", "clip_only",
                "sample_rate", "steps_per_client"):
        assert feds[f][key] == solo["federations"][0][key], key
    assert feds[f]["noise_multiplier"] == 0.0 and feds[f]["clip_only"] is True
    assert feds[f]["target_epsilon"] == feds[f]["epsilon_spent"] == "inf"
    assert feds[3]["clip_only"] is False and feds[3]["noise_multiplier"] > 0
    assert 0 < feds[3]["epsilon_spent"] <= 3.0 and feds[3]["target_epsilon"] == 3.0
    g_shared = torch.load(tmp_path / "shared" / "final_global.pt")["global"]
    g_solo = torch.load(tmp_path / "solo" / "final_global.pt")["global"]
    for name, v in g_solo.items():
        assert torch.equal(g_shared[name][f], v[0]), name
    assert not torch.equal(g_shared["classifier.weight"][3], g_solo["classifier.weight"][0])   # eps 3: noise
    assert yaml.safe_load((tmp_path / "solo" / "config.yaml").read_text())["dp"]["epsilon"] == math.inf

    cfg = yaml.safe_load((tmp_path / "shared" / "config.yaml").read_text())
    runs = [dict(name="shared", meta={"labels": {"task": "sst2", "method": "fedavg_lora"}}, cfg=cfg,
                 summary=shared)]
    df = federation_frame(runs, privacy=True)
    assert list(df["privacy"]) == [CLIP_ONLY_LABEL, "ε=3"] * 2 and CLIP_ONLY_LABEL == "σ=0 (clip only)"
    assert list(df["epsilon"]) == [math.inf, 3.0] * 2 and list(df["dp.epsilon"]) == [math.inf, 3.0] * 2
    assert privacy_order(["ε=1", CLIP_ONLY_LABEL, "ε=3", "non-private", "ε=6", CLIP_ONLY_LABEL]) == \
        ["non-private", CLIP_ONLY_LABEL, "ε=6", "ε=3", "ε=1"]

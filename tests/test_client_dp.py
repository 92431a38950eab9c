"""Client-level DP (DP-FedAvg, fedsim/dp.py): each client's whole update clipped to C, equal weights, Gaussian
noise sigma C / m on the average, one accounted release per round at q = clients per round / clients;
adaptive clipping (Andrew et al.) moves C from a noised count. Checked: clipped norms, the update the server
applies, the noise's std, epsilon against Opacus' accountant, adaptive clipping's formula, independence."""
import json
import math

import pytest
import torch

from fedsim.config import load_config
from fedsim.dp import ClientDPSetup, adapt_clip, clip_updates, update_noise_multiplier
from fedsim.rng import torch_generator
from partitions import dirichlet_label_skew
from tests.helpers import make_engine

SGD = {"name": "sgd", "lr": 0.2, "momentum": 0.0}
TARGETS = ["query", "value"]
CLIENTS, FRACTION = 4, 0.5


def _engine(make_model, data, seeds=(4,)):
    parts = [dirichlet_label_skew(data["labels"].numpy(), CLIENTS, alpha=0.5, seed=s) for s in seeds]
    return make_engine(make_model, data, parts, seeds=list(seeds), optimizer=SGD, targets=TARGETS, fraction=FRACTION)


def _client_engine(make_model, data, C, sigmas, seeds=(4,), quantile=None):
    from fedsim.engine import Federation, build_engine
    from methods import make_method
    parts = [dirichlet_label_skew(data["labels"].numpy(), CLIENTS, alpha=0.5, seed=s) for s in seeds]
    feds = [Federation(seed=s, lr=SGD["lr"], lora_alpha=8.0, noise_multiplier=sig, partitions=p)
            for s, sig, p in zip(seeds, sigmas, parts)]
    setup = ClientDPSetup(max_update_norm=C, target_quantile=quantile, count_stddev=5.0 if quantile else None)
    return build_engine(make_method({"name": "fedavg_lora"}, {"rank": 4, "alpha": 8.0, "targets": TARGETS}),
                        make_model(), data, feds, local_steps=3, batch_size=4, client_fraction=FRACTION,
                        optimizer=SGD, client_dp=setup, replica_chunk=2)   # one federation's replicas per chunk


def test_clip_updates_caps_each_clients_joint_norm():
    torch.manual_seed(0)              # fp64: the direction check divides (x + f delta) - x by delta
    x = {"a": torch.randn(2, 5, 3, dtype=torch.float64), "b": torch.randn(2, 7, dtype=torch.float64)}
    y = {"a": x["a"][:, None] + torch.randn(2, 3, 5, 3, dtype=torch.float64),
         "b": x["b"][:, None] + 0.01 * torch.randn(2, 3, 7, dtype=torch.float64)}
    C = torch.tensor([1.0, 0.5], dtype=torch.float64)
    clipped, norms = clip_updates(x, y, C)
    joint = lambda s: torch.stack([(s[n] - x[n][:, None]).flatten(2).pow(2).sum(-1) for n in s]).sum(0).sqrt()  # noqa
    assert torch.allclose(norms, joint(y))
    assert torch.allclose(joint(clipped), torch.minimum(norms, C[:, None]), rtol=1e-5)
    for n in y:                                 # direction kept: clipped delta = factor x delta, one factor per client
        ratio = (clipped[n] - x[n][:, None]).flatten(2) / (y[n] - x[n][:, None]).flatten(2)
        assert torch.allclose(ratio, (C[:, None] / (norms + 1e-6)).clamp(max=1)[..., None].expand_as(ratio), rtol=1e-4)


def test_server_applies_the_mean_of_clipped_updates(make_model, sst2_small):
    """sigma 0: the new global is x + (1/m) sum_i min(1, C / ||delta_i||) delta_i, the deltas being exactly the
    updates a non-private FedAvg round trains (clients train without per-sample noise)."""
    plain = _engine(make_model, sst2_small)
    x = {n: v.clone() for n, v in plain.global_state.items()}
    plain.run_round()
    m = plain.clients_per_round
    deltas = [{n: plain.tensors[n][r].detach() - x[n][0] for n in x} for r in range(m)]
    norms = [math.sqrt(sum(d[n].pow(2).sum().item() for n in d)) for d in deltas]
    C = sorted(norms)[0] * 1.001 if norms[0] == norms[1] else (norms[0] + norms[1]) / 2   # one clipped, one not
    assert min(norms) < C < max(norms)
    dp = _client_engine(make_model, sst2_small, C, [0.0])
    dp.run_round()
    for n in x:
        want = x[n][0] + sum(min(1.0, C / (nm + 1e-6)) * d[n] for d, nm in zip(deltas, norms)) / m
        assert torch.allclose(dp.global_state[n][0], want, rtol=1e-5, atol=1e-7), n


def test_noise_on_the_average_has_std_sigma_C_over_m(make_model, sst2_small):
    C, sigma = 0.05, 3.0
    quiet, noisy = (_client_engine(make_model, sst2_small, C, [s]) for s in (0.0, sigma))
    quiet.run_round()
    noisy.run_round()
    diff = torch.cat([(noisy.global_state[n] - quiet.global_state[n]).flatten() for n in quiet.global_state])
    want = sigma * C / quiet.clients_per_round
    assert diff.numel() > 10_000
    assert abs(diff.std().item() / want - 1) < 0.03 and abs(diff.mean().item()) < 0.03 * want


def test_federations_of_a_pass_equal_their_solo_runs(make_model, sst2_small):
    """Two seeds at two noise levels with adaptive clipping in one pass: each equals its solo run bit for bit."""
    both = _client_engine(make_model, sst2_small, 0.05, [1.0, 0.5], seeds=(4, 5), quantile=0.5)
    for _ in range(2):
        both.run_round()
    for f, (seed, sigma) in enumerate([(4, 1.0), (5, 0.5)]):
        solo = _client_engine(make_model, sst2_small, 0.05, [sigma], seeds=(seed,), quantile=0.5)
        for _ in range(2):
            solo.run_round()
        assert both.update_clip[f] == solo.update_clip[0]
        for n, v in solo.global_state.items():
            assert torch.equal(both.global_state[n][f], v[0]), (seed, n)


def test_adaptive_clip_follows_andrew_et_al():
    setup = ClientDPSetup(max_update_norm=1.0, target_quantile=0.5, clip_lr=0.2, count_stddev=0.3)
    C = torch.tensor([1.0, 2.0])
    norms = torch.tensor([[0.5, 0.9, 1.5, 3.0], [0.5, 0.9, 1.5, 3.0]])
    keys = [(7, "clip_count_noise", 0), (8, "clip_count_noise", 0)]
    z = [torch.randn((), generator=torch_generator(*k)).item() for k in keys]
    unclipped = [2, 3]
    want = [c * math.exp(-0.2 * ((u + 0.3 * zz) / 4 - 0.5)) for c, u, zz in zip([1.0, 2.0], unclipped, z)]
    assert torch.allclose(adapt_clip(C, norms, setup, keys), torch.tensor(want))
    # the count's release takes its share of the noise: total sigma stays the accountant's
    s = update_noise_multiplier(1.0, 2.0)
    assert s ** -2 + 4.0 ** -2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="raise dp.clipped_count_stddev"):
        update_noise_multiplier(1.0, 0.4)


@pytest.mark.parametrize("epsilon,clients,fraction,rounds", [(3.0, 20, 0.25, 6), (8.0, 40, 0.1, 10)])
def test_sigma_and_epsilon_against_opacus(epsilon, clients, fraction, rounds):
    """The run's sampling rate is clients per round / clients and its steps are rounds; sigma is the smallest
    that meets the target under Opacus' RDP accountant: epsilon at sigma is at most the target, and 2% less
    noise overshoots it."""
    from opacus.accountants import RDPAccountant
    from fedsim.dp import RDP_ORDERS
    from fedsim.run import Experiment
    cfg = load_config(overrides=dict(num_hidden_layers=2, train_subsample=400, num_clients=clients,
                                     client_fraction=fraction, rounds=rounds, partition={"name": "iid"},
                                     **{"dp.epsilon": epsilon, "dp.unit": "client"}))
    exp = Experiment(cfg)
    assert exp.dp is None and exp.sample_rate == pytest.approx(round(fraction * clients) / clients)
    assert exp.steps_per_client == rounds

    def opacus_eps(sigma):
        acc = RDPAccountant()
        for _ in range(rounds):
            acc.step(noise_multiplier=sigma, sample_rate=exp.sample_rate)
        return acc.get_epsilon(delta=cfg["dp"]["delta"], alphas=list(RDP_ORDERS))
    sigma = exp.federations[0].noise_multiplier
    assert opacus_eps(sigma) <= epsilon * 1.001 and opacus_eps(0.98 * sigma) > epsilon


def test_a_client_level_run_reports_its_unit_and_clip(tmp_path):
    from fedsim.run import run
    cfg = load_config("configs/smoke.yaml", {"dp.unit": "client", "dp.epsilon": 8.0, "dp.target_quantile": 0.5,
                                            "dp.clipped_count_stddev": 20.0, "rounds": 3, "seeds": [0]})
    summary = run(cfg, tmp_path / "r", progress=False)
    assert summary["private"] and summary["dp_unit"] == "client" and "client's whole dataset" in summary["protects"]
    fed = summary["federations"][0]
    assert fed["sample_rate"] == 0.5 and fed["steps_per_client"] == 3 and fed["epsilon_spent"] <= 8.0 * 1.001
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    clips = [r["update_clip"] for r in rows]
    assert clips[0] == pytest.approx(0.1) and len(set(clips)) == 3          # adaptive: C moves every round

"""Server optimizers (fedsim/server_optimizers.py), orthogonal to the method: FedAvgM at server lr 1 without
momentum is FedAvg bit for bit; each optimizer equals the sequential reference's plain formulas over rounds
(moments carried); they compose with another method; their moments survive a checkpoint."""
import pytest
import torch

from fedsim.reference import run_reference
from partitions import dirichlet_label_skew
from tests.helpers import assert_same, make_engine, reference_cfg

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0}
TARGETS = ["query", "value"]


def _engine(make_model, data, server, method="fedavg_lora", server_lrs=None, seeds=(2,), chunk=None):
    parts = [dirichlet_label_skew(data["labels"].numpy(), 3, alpha=0.5, seed=s) for s in seeds]
    return make_engine(make_model, data, parts, seeds=list(seeds), optimizer=SGD, targets=TARGETS, fraction=2 / 3,
                       method=method, server=server, server_lrs=server_lrs, chunk=chunk), parts


def test_fedavgm_at_lr_one_without_momentum_is_fedavg_exactly(make_model, sst2_small):
    m, _ = _engine(make_model, sst2_small, {"optimizer": "fedavgm", "momentum": 0.0})
    plain, _ = _engine(make_model, sst2_small, None)
    for _ in range(2):
        m.run_round()
        plain.run_round()
    for n, v in plain.global_state.items():
        assert torch.equal(m.global_state[n], v), n


@pytest.mark.parametrize("name,lr", [("fedavgm", 0.7), ("fedadagrad", 0.01), ("fedadam", 0.01), ("fedyogi", 0.01)])
def test_server_optimizer_equals_sequential_reference(make_model, sst2_small, name, lr):
    """3 rounds: the moments of rounds 1-2 shape the steps of rounds 2-3."""
    server = {"optimizer": name, "momentum": 0.9, "beta2": 0.99, "tau": 1e-3}
    eng, (parts,) = _engine(make_model, sst2_small, server, server_lrs=[lr])
    init = {k: v[0].clone() for k, v in eng.global_state.items()}
    for _ in range(3):
        eng.run_round()
    cfg = reference_cfg(SGD, TARGETS, 2 / 3, seed=2, rounds=3, server_optimizer=name, server_lr=lr,
                        server_momentum=0.9, server_beta2=0.99, server_tau=1e-3)
    ref, _ = run_reference(make_model, sst2_small, parts, init, cfg)
    assert_same({k: v[0] for k, v in eng.global_state.items()}, ref)
    plain, _ = run_reference(make_model, sst2_small, parts, init, reference_cfg(SGD, TARGETS, 2 / 3, seed=2, rounds=3))
    assert (ref["classifier.weight"] - plain["classifier.weight"]).norm() > 1e-4 * plain["classifier.weight"].norm()


def test_server_optimizer_steps_only_what_the_method_shares(make_model, sst2_small):
    """FedSA-LoRA + FedAdam: A and the head take the server's step, the clients' own B never does."""
    eng, _ = _engine(make_model, sst2_small, {"optimizer": "fedadam"}, method="fedsa_lora", server_lrs=[0.01])
    eng.run_round()
    stepped = set(eng.server_opt.state)
    assert stepped and all(not n.endswith(".lora_B") for n in stepped)
    assert any(n.endswith(".lora_A") for n in stepped) and "classifier.weight" in stepped


def test_server_lr_variants_share_a_pass_and_moments_resume(make_model, sst2_small):
    """Two server learning rates as two federations of one pass equal their solo runs; a checkpoint after
    round 1 resumes to the same round-2 state. One federation per replica chunk (chunk = the 2 clients per
    round), the condition of bitwise equality (README, "Seeds and sweeps"): a chunk of both federations runs
    the frozen backbone's GEMMs at twice the rows, and MKL's AVX-512 sgemm splits a 1536-deep product
    differently at 258 rows than at 129 (last-bit differences, seen on a Xeon with AVX-512)."""
    server = {"optimizer": "fedyogi"}
    both, _ = _engine(make_model, sst2_small, server, server_lrs=[0.01, 0.03], seeds=(2, 2), chunk=2)
    for _ in range(2):
        both.run_round()
    for f, lr in enumerate([0.01, 0.03]):
        solo, _ = _engine(make_model, sst2_small, server, server_lrs=[lr])
        solo.run_round()
        state = solo.state_dict()
        resumed, _ = _engine(make_model, sst2_small, server, server_lrs=[lr])
        resumed.load_state_dict(state)
        resumed.run_round()
        for n, v in resumed.global_state.items():
            assert torch.equal(both.global_state[n][f], v[0]), (lr, n)


def test_unknown_server_optimizer_is_refused():
    from fedsim.server_optimizers import make_server_optimizer
    with pytest.raises(ValueError, match="unknown server.optimizer 'fedadamw'; valid: .*fedadam"):
        make_server_optimizer("fedadamw", torch.ones(1))


def test_moments_restart_when_the_method_changes_what_it_shares(make_model, sst2_small):
    """SLoRA's switch from sparse deltas to LoRA factors: the sparse deltas' moments are dropped, the factors
    start theirs from zero (their first step is FedAdam's first step, not a continuation)."""
    eng, _ = _engine(make_model, sst2_small, {"optimizer": "fedadam"}, server_lrs=[0.01],
                     method={"name": "slora", "stage1_rounds": 1, "density": 0.05})
    eng.run_round()
    assert any(n.endswith(".sparse") for n in eng.server_opt.state)
    eng.run_round()
    names = set(eng.server_opt.state)
    assert not any(n.endswith(".sparse") for n in names) and any(n.endswith(".lora_B") for n in names)
    m = eng.server_opt.state[next(n for n in names if n.endswith(".lora_B"))]["m"]
    v = eng.server_opt.state[next(n for n in names if n.endswith(".lora_B"))]["v"]
    # after one step from m = 0, v = tau^2: m = (1 - beta1) delta, v = beta2 tau^2 + (1 - beta2) delta^2
    delta = m / 0.1
    torch.testing.assert_close(v, 0.99 * 1e-6 + 0.01 * delta * delta)

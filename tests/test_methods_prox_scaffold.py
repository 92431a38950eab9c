"""FedProx and SCAFFOLD (methods/fedprox.py, methods/scaffold.py): each equals a plain sequential loop that
writes its math out (fedsim/reference.py: the proximal gradient, option II control variates), and FedProx at
mu = 0 is FedAvg-LoRA bit for bit."""
import pytest
import torch

from fedsim.reference import run_reference
from partitions import dirichlet_label_skew
from tests.helpers import assert_same, make_engine, reference_cfg, rel_err

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0}
TARGETS = ["query", "value"]


def _parts(data, clients, seed=3):
    return dirichlet_label_skew(data["labels"].numpy(), clients, alpha=0.5, seed=seed)


def _run(make_model, data, parts, method, rounds, fraction, seed=3, optimizer=SGD):
    eng = make_engine(make_model, data, [parts], seeds=[seed], optimizer=optimizer, targets=TARGETS, fraction=fraction,
                      method=method)
    init = {k: v[0].clone() for k, v in eng.global_state.items()}
    for _ in range(rounds):
        eng.run_round()
    return eng, init


def test_fedprox_mu_zero_is_fedavg_bit_for_bit(make_model, sst2_small):
    parts = _parts(sst2_small, 3)
    prox, _ = _run(make_model, sst2_small, parts, {"name": "fedprox", "mu": 0.0}, 2, 2 / 3)
    avg, _ = _run(make_model, sst2_small, parts, "fedavg_lora", 2, 2 / 3)
    for n, v in avg.global_state.items():
        assert torch.equal(prox.global_state[n], v), n


def test_fedprox_equals_sequential_reference(make_model, sst2_small):
    parts = _parts(sst2_small, 3)
    mu = 2.0                        # large enough that the proximal pull changes the result visibly
    eng, init = _run(make_model, sst2_small, parts, {"name": "fedprox", "mu": mu}, 2, 2 / 3)
    ref, _ = run_reference(make_model, sst2_small, parts, init, reference_cfg(SGD, TARGETS, 2 / 3, seed=3,
                                                                                 prox_mu=mu))
    assert_same({k: v[0] for k, v in eng.global_state.items()}, ref)
    plain, _ = run_reference(make_model, sst2_small, parts, init, reference_cfg(SGD, TARGETS, 2 / 3, seed=3))
    assert rel_err(ref["classifier.weight"] - init["classifier.weight"],
                   plain["classifier.weight"] - init["classifier.weight"]) > 1e-3    # mu mattered


ADAMW = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}


@pytest.mark.parametrize("clients,fraction,optimizer", [(2, 1.0, SGD), (3, 2 / 3, SGD), (3, 2 / 3, ADAMW)],
                         ids=["2-clients", "3-clients", "3-clients-adamw"])
def test_scaffold_equals_sequential_reference(make_model, sst2_small, clients, fraction, optimizer):
    """2 clients (both every round) and 3 clients (2 per round: an unsampled client keeps its variate);
    3 rounds, so the variates of rounds 1 and 2 steer rounds 2 and 3. With AdamW the correction moves the
    model after the optimizer's step, never through it (the reference writes that out); compared in fp64, as
    every AdamW engine-vs-reference test is (Adam amplifies fp32 rounding where its second moment is tiny)."""
    parts = _parts(sst2_small, clients)
    if optimizer is ADAMW:
        fresh = make_model
        make_model = lambda: fresh().to(torch.float64)  # noqa: E731
    eng, init = _run(make_model, sst2_small, parts, "scaffold", 3, fraction, optimizer=optimizer)
    ref, _ = run_reference(make_model, sst2_small, parts, init, reference_cfg(optimizer, TARGETS, fraction, seed=3,
                                                                                 rounds=3, scaffold=True))
    assert_same({k: v[0] for k, v in eng.global_state.items()}, ref)
    avg, _ = run_reference(make_model, sst2_small, parts, init, reference_cfg(optimizer, TARGETS, fraction, seed=3,
                                                                                 rounds=3))
    assert rel_err(ref["classifier.weight"], avg["classifier.weight"]) > 1e-4      # the correction acted
    assert all(v.abs().sum() > 0 for v in eng.method.server_c.values())


def test_scaffold_resumes_from_a_checkpoint(make_model, sst2_small):
    """The control variates are method state: a run checkpointed after round 1 ends where the unbroken run does."""
    parts = _parts(sst2_small, 3)
    whole, _ = _run(make_model, sst2_small, parts, "scaffold", 2, 2 / 3)
    first, _ = _run(make_model, sst2_small, parts, "scaffold", 1, 2 / 3)
    state = first.state_dict()
    resumed, _ = _run(make_model, sst2_small, parts, "scaffold", 0, 2 / 3)
    resumed.load_state_dict(state)
    resumed.run_round()
    for n, v in whole.global_state.items():
        assert torch.equal(resumed.global_state[n], v), n


def test_scaffold_and_fedprox_bytes(make_model, sst2_small):
    parts = _parts(sst2_small, 3)
    sc, _ = _run(make_model, sst2_small, parts, "scaffold", 1, 2 / 3)
    avg, _ = _run(make_model, sst2_small, parts, "fedavg_lora", 1, 2 / 3)
    prox, _ = _run(make_model, sst2_small, parts, {"name": "fedprox", "mu": 0.1}, 1, 2 / 3)
    assert sc.ledger.rounds[0]["up_per_client"] == 2 * avg.ledger.rounds[0]["up_per_client"]     # model + variate
    assert prox.ledger.rounds == avg.ledger.rounds


def test_fedprox_rejects_negative_mu():
    from methods import make_method
    with pytest.raises(ValueError, match="mu must be >= 0"):
        make_method({"name": "fedprox", "mu": -0.1}, {"rank": 4, "alpha": 8.0, "targets": TARGETS})

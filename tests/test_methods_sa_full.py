"""SA-FedLoRA with init_stage "full" (methods/sa_fedlora.py, arXiv 2405.09394 read as full-parameter training
first): clients train a dense delta dW [out, in] on every LoRA target weight plus the head under the proximal
term; at round init_rounds the averaged dW stays folded into each federation's frozen weight (W0 + dW) and
LoRA starts from its usual init (A seeded, B = 0), then anneals as with init_stage "lora"."""
import copy

import pytest
import torch
from torch import nn

from fedsim.dp import max_poisson_batch
from fedsim.engine import DPSetup
from fedsim.grads import GradBuffer
from fedsim.rng import torch_generator
from fedsim.stacked import StackedLoRALinear, _StackedState
from fedsim.containers import build_container
from methods import make_method
from methods.initializers import kaiming_uniform_A
from partitions import dirichlet_label_skew
from tests.helpers import make_engine, rel_err

QV = ["query", "value"]
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0}
LORA = {"rank": 4, "alpha": 8.0, "targets": QV}


def full_cfg(**kw):
    return dict({"name": "sa_fedlora", "init_stage": "full", "init_rounds": 1, "anneal_rounds": 1,
                 "cooling_rank": 2, "mu": 0.1}, **kw)


def engine(make_model, data, parts_per_fed, cfg, *, seeds, **kw):
    kw = dict(dict(optimizer=SGD, fraction=1.0, K=2), **kw)
    return make_engine(make_model, data, parts_per_fed, seeds=seeds, targets=QV, method=cfg, **kw)


def nbytes(ts):
    return sum(t[0].numel() * t.element_size() for t in ts)


@torch.no_grad()
def probe(layer, r):
    """Replica r's layer applied to the identity: its effective weight^T (+ bias), through the real forward."""
    layer.state.active, layer.state.buffer = slice(r, r + 1), None
    return layer(torch.eye(layer.base.in_features, dtype=layer.A.dtype)[None])[0]


def test_full_stage_trains_dense_deltas_and_head_then_lora(make_model, sst2_small):
    """Rounds 0-1 (init_rounds 2): A, B untouched on every replica, every entry of dW and the head move; the
    upload = download per client is out * in values per target + head. Round 2: A, B and head train and travel,
    dW is frozen and no longer sent."""
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 3, alpha=0.5, seed=1)
    eng = engine(make_model, sst2_small, [parts], full_cfg(init_rounds=2, anneal_rounds=0, cooling_rank=4),
                 seeds=[1], fraction=2 / 3)
    init = {k: v.clone() for k, v in eng.global_state.items()}
    lora = eng.stacked.lora
    assert set(init) == {f"{n}.{k}" for n in lora for k in ("folded", "lora_A", "lora_B")} | {
        "classifier.weight", "classifier.bias"}
    head = nbytes([init["classifier.weight"], init["classifier.bias"]])
    dense = sum(layer.base.out_features * layer.base.in_features * 4 for layer in lora.values())
    factors = sum(nbytes([init[n + ".lora_A"], init[n + ".lora_B"]]) for n in lora)
    for t in range(2):
        before = {k: v.clone() for k, v in eng.global_state.items()}
        eng.run_round()
        for name in lora:
            for k in (".lora_A", ".lora_B"):
                local = eng.tensors[name + k]
                assert all(torch.equal(local[r], init[name + k][0]) for r in range(local.shape[0])), name + k
                assert torch.equal(eng.global_state[name + k], init[name + k])
            local = eng.tensors[name + ".folded"].detach() - before[name + ".folded"]
            assert (local != 0).float().mean() > 0.99, name         # a dense delta: (nearly) every entry moves
            assert not torch.equal(eng.global_state[name + ".folded"], before[name + ".folded"])
        assert not torch.equal(eng.global_state["classifier.weight"], before["classifier.weight"])
        sent = eng.ledger.rounds[t]
        assert sent["up_per_client"] == sent["down_per_client"] == dense + head
    assert not init[next(iter(lora)) + ".lora_B"].any()
    folded = {n: eng.global_state[n + ".folded"].clone() for n in lora}
    eng.run_round()                                                  # round 2: LoRA on W0 + dW
    for name in lora:
        assert torch.equal(eng.global_state[name + ".folded"], folded[name])     # frozen after the switch
        assert eng.global_state[name + ".lora_B"].norm() > 0
        assert not torch.equal(eng.global_state[name + ".lora_A"], init[name + ".lora_A"])
    sent = eng.ledger.rounds[2]
    assert sent["up_per_client"] == sent["down_per_client"] == factors + head
    assert dense > 10 * factors                                     # why the communication figure depends on it


def test_switch_folds_the_average_dense_delta_and_restarts_lora(make_model, sst2_small):
    """fp64, two federations: after the initiating stage each federation's effective weight is W0 + the
    sample-weighted mean of its clients' dW (computed here from the client replicas), LoRA's A is its seeded
    init and B = 0, so the adapter path adds nothing."""
    labels = sst2_small["labels"].numpy()
    parts = [dirichlet_label_skew(labels, 3, alpha=0.5, seed=s) for s in (0, 2)]
    eng = engine(lambda: make_model().double(), sst2_small, parts, full_cfg(), seeds=[0, 2], fraction=2 / 3)
    lora, m = eng.stacked.lora, eng.clients_per_round
    w0 = {n: probe(layer, 0) for n, layer in lora.items()}        # dW = 0, B = 0: the pretrained weight
    plan = eng.plan_round(0)
    eng.run_round()                                                 # the whole initiating stage
    sizes = torch.tensor([[len(parts[f][c]) for c in plan.sampled[f]] for f in range(2)], dtype=torch.float64)
    w = sizes / sizes.sum(1, keepdim=True)                          # [F, m] sample-count weights
    mean = {}
    for name in lora:
        clients = eng.tensors[name + ".folded"].detach().view(2, m, *lora[name].base.weight.shape)
        assert rel_err(clients[0, 0], clients[0, 1]) > 1e-3      # the clients' deltas differ
        mean[name] = sum(w[:, j, None, None] * clients[:, j] for j in range(m))
        assert rel_err(eng.global_state[name + ".folded"], mean[name]) < 1e-12
    eng._apply(eng.method.on_round_start(1, eng.global_state, eng.layout()))    # the switch
    eng.begin_round(eng.plan_round(1))                              # replicas take the new global state
    assert eng.stacked.rank == 4
    for name, layer in lora.items():
        assert not layer.folded.requires_grad and layer.A.requires_grad and layer.B.requires_grad
        assert not eng.global_state[name + ".lora_B"].any()
        for f, seed in enumerate((0, 2)):
            A0 = kaiming_uniform_A(layer.A.shape[1:], torch_generator(seed, "lora_A", name)).double()
            assert torch.equal(eng.global_state[name + ".lora_A"][f], A0)
            for r in range(f * m, (f + 1) * m):
                eff = probe(layer, r) - w0[name]                    # (W0 + dW + scale B A)^T - W0^T
                assert (eff.T - mean[name][f]).abs().max() <= 1e-12 * mean[name][f].abs().max()


def test_proximal_term_pulls_dense_delta_and_head(make_model, sst2_small):
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 2, alpha=0.5, seed=4)
    drift = {}
    for mu in (0.0, 8.0):                   # lr * mu = 0.8: each step pulls 80% of the way back
        eng = engine(make_model, sst2_small, [parts], full_cfg(mu=mu), seeds=[4], K=6)
        start = {n: v.clone() for n, v in eng.global_state.items()}
        eng.run_round()
        for group in (".folded", "classifier."):
            drift[mu, group] = sum((eng.tensors[n].detach() - start[n].repeat_interleave(2, 0)).pow(2).sum()
                                   for n in start if group in n).sqrt()
    for group in (".folded", "classifier."):
        assert 0 < drift[8.0, group] < 0.5 * drift[0.0, group], (group, drift)


@pytest.mark.parametrize("at", [1, 2], ids=["before-switch", "after-switch"])
def test_full_stage_resumes_bit_for_bit(make_model, sst2_small, at):
    """Killed after the initiating stage (at=1: the switch is still to come) or after the switch and a LoRA round
    (at=2: the folded dW must come back from the checkpoint): a fresh engine ends bitwise the same."""
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 2, alpha=1.0, seed=3)
    eng = engine(make_model, sst2_small, [parts], full_cfg(), seeds=[3])
    ckpt = None
    for t in range(3):                               # full, LoRA at rank 4, LoRA truncated to rank 2
        if t == at:
            ckpt = copy.deepcopy(eng.state_dict())
        eng.run_round()
    assert eng.stacked.rank == 2
    resumed = engine(make_model, sst2_small, [parts], full_cfg(), seeds=[3])
    resumed.load_state_dict(ckpt)
    for _ in range(at, 3):
        resumed.run_round()
    assert set(resumed.global_state) == set(eng.global_state)
    for k, v in eng.global_state.items():
        assert torch.equal(v, resumed.global_state[k]), k
    assert resumed.ledger.rounds == eng.ledger.rounds


@pytest.mark.parametrize("private", [False, True], ids=["nodp", "dp"])
def test_full_stage_federation_in_a_pass_equals_itself_alone(make_model, sst2_small, private):
    """Two seeds x two learning rates in one pass (two federations under DP; fp32, chunks of one federation's
    replicas), three rounds:
    the dense stage, the switch, a truncation; each federation equals its solo run bit for bit. Under DP the
    dense deltas' per-sample gradients are clipped jointly with the head's and noised per federation."""
    feds = [(3, 0.1), (4, 0.03)] if private else [(3, 0.1), (3, 0.03), (4, 0.1), (4, 0.03)]
    labels = sst2_small["labels"].numpy()
    dp = DPSetup(max_grad_norm=0.5, sample_rate=0.05, max_batch=32) if private else None

    def run(fs):
        parts = [dirichlet_label_skew(labels, 3, alpha=0.5, seed=s) for s, _ in fs]
        e = engine(make_model, sst2_small, parts, full_cfg(), seeds=[s for s, _ in fs], lrs=[lr for _, lr in fs],
                   optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, fraction=2 / 3, chunk=2, dp=dp,
                   sigmas=[0.7] * len(fs) if private else None)
        for _ in range(3):
            e.run_round()
        return e.global_state
    shared = run(feds)
    assert shared[next(n for n in shared if n.endswith("lora_A"))].shape[1] == 2       # truncation happened
    assert all(shared[n].norm() > 0 for n in shared if n.endswith(".folded"))
    for f, fed in enumerate(feds):
        solo = run([fed])
        for name, tensor in solo.items():
            assert torch.equal(shared[name][f], tensor[0]), f"federation {fed}: {name}"
    flat = torch.cat([v.flatten(1) for v in shared.values()], 1)
    assert all(rel_err(flat[f], flat[0]) > 1e-5 for f in range(1, len(feds)))


def test_full_stage_packed_tokens_equal_padded_under_dp(make_model, sst2_small):
    """The dense deltas' per-sample gradients through packed real tokens (fedsim.packed) equal those of the padded,
    length-grouped forward: ragged Poisson batches, clipping and noise (the LoRA stage: tests/test_engine.py)."""
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 3, alpha=1.0, seed=5)
    dp = DPSetup(max_grad_norm=0.5, sample_rate=0.1, max_batch=max_poisson_batch(0.1 * max(map(len, parts))))
    engines = [engine(make_model, sst2_small, [parts, parts], full_cfg(), seeds=[6, 7], fraction=2 / 3, b=8, dp=dp,
                      sigmas=[0.7, 0.7], chunk=3, packed_tokens=p) for p in (True, False)]
    assert engines[0].stacked.runs_packed_tokens and not engines[1].stacked.runs_packed_tokens
    for eng in engines:
        eng.run_round()                                              # the dense stage
    for n, v in engines[1].global_state.items():
        torch.testing.assert_close(engines[0].global_state[n], v, rtol=1e-5, atol=1e-6, msg=n)
    assert all(v.norm() > 0 for n, v in engines[0].global_state.items() if n.endswith(".folded"))


@pytest.mark.parametrize("per_sample", [True, False])
def test_trained_dense_delta_gradients_equal_dense_loop(per_sample):
    """The container's trained dense delta (train_folded, `folded` requiring grad): forward as the frozen one, dW
    per replica (summed or per sample) and dx equal autograd on W + dW_r + scale B_r A_r, one sample at a time;
    a layer built without train_folded never differentiates it."""
    torch.manual_seed(0)
    R, b, T, n_in, out, rank = 2, 3, 4, 6, 5, 2
    base = nn.Linear(n_in, out)
    state = _StackedState()
    layer = StackedLoRALinear(base, "lin", R, rank, state, folded=True, train_folded=True)
    with torch.no_grad():                           # LoRA non-zero too: the two paths must not interfere
        layer.A.normal_(), layer.B.normal_(), layer.folded.normal_(), layer.scale.fill_(0.5)
    x = torch.randn(R * b, T, n_in, requires_grad=True)
    G = torch.randn(R * b, T, out)
    state.active, state.batch_size = slice(None), b
    frozen = StackedLoRALinear(base, "lin", R, rank, state, folded=True)     # FedEx-LoRA's: never trained
    frozen.load_state_dict(layer.state_dict())
    frozen.folded.requires_grad_(True)
    with torch.no_grad():
        want_y = layer(x)                          # not requiring grad: the frozen path
    state.buffer = GradBuffer([("lin.folded", (out, n_in))], R, b, per_sample, "cpu")
    y = frozen(x.detach())
    assert torch.equal(y.detach(), want_y)
    (y * G).sum().backward()
    assert state.buffer.missing() == ["lin.folded"]          # without train_folded nothing differentiates it
    layer.folded.requires_grad_(True)
    state.buffer = GradBuffer([("lin.folded", (out, n_in))], R, b, per_sample, "cpu")
    y = layer(x)
    assert torch.equal(y.detach(), want_y)
    (y * G).sum().backward()
    got = state.buffer.unflatten(state.buffer.flat.flatten(0, 1))["lin.folded"].view(R, b, out, n_in) \
        if per_sample else state.buffer.summed["lin.folded"]
    assert layer.folded.grad is None               # gradients go to the buffer only

    want, want_x = torch.zeros(R, b, out, n_in), torch.zeros_like(x)
    for r in range(R):
        for n in range(b):
            d = layer.folded[r].detach().clone().requires_grad_(True)
            xn = x[r * b + n].detach().clone().requires_grad_(True)
            W = base.weight + 0.5 * layer.B[r] @ layer.A[r] + d
            ((xn @ W.T + base.bias) * G[r * b + n]).sum().backward()
            want[r, n], want_x[r * b + n] = d.grad, xn.grad
    torch.testing.assert_close(got, want if per_sample else want.sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-5, atol=1e-6)


def test_default_init_stage_is_lora_without_dense_deltas(make_model):
    for params in ({}, {"init_stage": "lora"}):
        m = make_method({"name": "sa_fedlora", **params}, LORA)
        stacked = build_container(m, make_model(), 2)
        assert all(layer.folded is None for layer in stacked.lora.values())
        state = m.init_global(stacked.layout(1), [0]).global_state
        assert not any(k.endswith(".folded") for k in state)
        assert all(m.trained(k, 0) for k in state)


@pytest.mark.parametrize("params,match", [
    ({"init_stage": "dense"}, r"init_stage 'dense' unknown; valid: \['lora', 'full'\]"),
    ({"init_stage": "full", "init_rounds": 0}, "set init_rounds >= 1 or init_stage: lora"),
    ({"init_stage": True}, "parameter init_stage must be str"),
])
def test_bad_init_stage_is_a_clear_error(params, match):
    with pytest.raises(ValueError, match=match):
        make_method({"name": "sa_fedlora", **params}, LORA)

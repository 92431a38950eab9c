"""SLoRA (sparse stage 1 -> SVD-initialised LoRA) and FedAvg full fine-tuning, both through the batched engine."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.engine import DPSetup, Federation, build_engine
from fedsim.full_stacked import FullStackedModel
from fedsim.reference import ReferenceConfig, per_sample_grads, run_reference
from fedsim.grads import GradBuffer
from fedsim.stacked import StackedLoRALinear, _StackedState
from fedsim.containers import build_container
from methods import make_method
from partitions import dirichlet_label_skew

LORA = {"rank": 4, "alpha": 8.0, "targets": ["query", "value"]}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0}


def engine_for(method, make_model, data, parts_per_fed, *, seeds, optimizer=SGD, fraction=1.0, K=2, b=4,
               dp=None, sigmas=None):
    feds = [Federation(seed=s, lr=optimizer["lr"], lora_alpha=LORA["alpha"],
                       noise_multiplier=(sigmas or [0.0] * len(seeds))[i], partitions=p)
            for i, (s, p) in enumerate(zip(seeds, parts_per_fed))]
    return build_engine(method, make_model(), data, feds, local_steps=K, batch_size=b, client_fraction=fraction,
                        optimizer=optimizer, dp=dp)


def slora(**params):
    return make_method({"name": "slora", **params}, LORA)


@torch.no_grad()
def probe(layer, r):
    """Replica r's layer applied to the identity: its effective weight^T (+ bias), through the real forward."""
    layer.state.active, layer.state.buffer = slice(r, r + 1), None
    return layer(torch.eye(layer.base.in_features, dtype=layer.A.dtype)[None])[0]


def nbytes(ts):
    return sum(t[0].numel() * t.element_size() for t in ts)


# ---------------------------------------------------------------------------------------------- SLoRA

def test_slora_mask_is_shared_seeded_and_of_target_density(make_model):
    a = slora(density=0.01)
    stacked = build_container(a, make_model(), 4)
    stacked.apply(a.init_global(stacked.layout(2), seeds=[0, 3]), clients_per_round=2)
    for name, layer in stacked.lora.items():
        out, n_in = layer.base.weight.shape
        rows, cols = layer.sparse_rows, layer.sparse_cols
        assert abs(len(rows) / (out * n_in) - 0.01) <= 1e-3
        assert len(set(zip(rows.tolist(), cols.tolist()))) == len(rows)            # distinct positions
        assert layer.sparse.shape == (4, len(rows))                                 # one value row per replica
        # the server regenerates it from mask_seed alone: another method instance, other federation seeds
        other = slora(density=0.01)
        s2 = build_container(other, make_model(), 1)
        s2.apply(other.init_global(s2.layout(1), seeds=[7]), clients_per_round=1)
        assert torch.equal(s2.lora[name].sparse_rows, rows) and torch.equal(s2.lora[name].sparse_cols, cols)
    assert list(stacked.tensors())[:3] == [f"{n}.{k}" for n in [next(iter(stacked.lora))]
                                           for k in ("sparse", "lora_A", "lora_B")]
    with pytest.raises(ValueError, match="unknown parameter"):
        slora(rank_budget=3)
    with pytest.raises(ValueError, match="unknown parameter"):
        make_method({"name": "fedavg_fft", "density": 0.1}, LORA)


def test_slora_stage1_sparse_then_stage2_best_rank_r(make_model, sst2_small):
    """fp64: the early stage-1 update (~1e-7) is below fp32 resolution of W0 + dW, so the effective-weight
    checks would only test rounding; the math is the same in both precisions."""
    labels = sst2_small["labels"].numpy()
    parts = [dirichlet_label_skew(labels, 2, alpha=1.0, seed=s) for s in (0, 3)]
    method = slora(stage1_rounds=1, density=0.02)
    eng = engine_for(method, lambda: make_model().double(), sst2_small, parts, seeds=[0, 3])
    lora = eng.stacked.lora
    w0 = {n: probe(layer, 0) for n, layer in lora.items()}          # values 0, B = 0: the pretrained weight

    eng.run_round()                                                   # stage 1
    for name, layer in lora.items():
        masked = torch.zeros_like(w0[name], dtype=torch.bool)
        masked[layer.sparse_cols, layer.sparse_rows] = True           # probe is W^T
        for r in range(eng.num_replicas):                                        # every client of both federations
            changed = probe(layer, r) != w0[name]
            assert changed.any() and not (changed & ~masked).any()
        assert not layer.A.any() and not layer.B.any()                # LoRA untouched in stage 1

    dW = {}
    for name, layer in lora.items():
        d = torch.zeros(2, *layer.base.weight.shape, dtype=torch.float64)
        d[:, layer.sparse_rows, layer.sparse_cols] = eng.global_state[name + ".sparse"].double()
        dW[name] = d
    eng._apply(method.on_round_start(1, eng.global_state, eng.layout()))       # the stage switch
    assert not any(k.endswith(".sparse") for k in list(eng.global_state) + list(eng.stacked.tensors()))
    scale = LORA["alpha"] / LORA["rank"]
    for name, layer in lora.items():
        for f in range(2):
            A, B = eng.global_state[name + ".lora_A"][f], eng.global_state[name + ".lora_B"][f]
            approx = scale * (B.double() @ A.double())
            U, S, Vh = torch.linalg.svd(dW[name][f])
            residual = (dW[name][f] - approx).norm()
            assert torch.isclose(residual, S[4:].pow(2).sum().sqrt(), rtol=1e-8)              # Eckart-Young
            best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
            assert (approx - best).norm() <= 1e-8 * best.norm()
            assert torch.allclose(A.norm(dim=1), B.norm(dim=0), rtol=1e-8)                   # balanced split
            layer.A.data[f * 2], layer.B.data[f * 2] = A, B                                   # replica f*m
            eff = probe(layer, f * 2) - w0[name]                     # W0 back (sparse dropped) + LoRA
            assert (eff.T - best).abs().max() <= 1e-6 * best.abs().max()
    eng.run_round()                                                   # stage 2 = FedAvg-LoRA
    assert all(eng.global_state[n + ".lora_B"].norm() > 0 for n in lora)


@pytest.mark.parametrize("per_sample", [True, False])
def test_sparse_delta_gradients_equal_dense_loop(per_sample):
    torch.manual_seed(0)
    R, b, T, n_in, out, rank = 2, 3, 4, 6, 5, 2
    base = nn.Linear(n_in, out)
    state = _StackedState()
    layer = StackedLoRALinear(base, "lin", R, rank, state)
    idx = torch.randperm(out * n_in)[:9]
    layer.set_sparse(idx // n_in, idx % n_in)
    with torch.no_grad():                           # LoRA non-zero too: the two paths must not interfere
        layer.A.normal_(), layer.B.normal_(), layer.sparse.normal_(), layer.scale.fill_(0.5)
    layer.sparse.requires_grad_(True)
    x = torch.randn(R * b, T, n_in, requires_grad=True)
    G = torch.randn(R * b, T, out)
    state.active, state.batch_size = slice(None), b
    state.buffer = GradBuffer([("lin.sparse", (9,))], R, b, per_sample, "cpu")
    (layer(x) * G).sum().backward()
    got = state.buffer.flat if per_sample else state.buffer.summed["lin.sparse"]

    want, want_x = torch.zeros(R, b, 9), torch.zeros_like(x)
    for r in range(R):
        for n in range(b):
            v = layer.sparse[r].detach().clone().requires_grad_(True)
            xn = x[r * b + n].detach().clone().requires_grad_(True)
            W = base.weight + 0.5 * layer.B[r] @ layer.A[r] + torch.zeros(out, n_in).index_put(
                (layer.sparse_rows, layer.sparse_cols), v)
            ((xn @ W.T + base.bias) * G[r * b + n]).sum().backward()
            want[r, n], want_x[r * b + n] = v.grad, xn.grad
    torch.testing.assert_close(got, want if per_sample else want.sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-5, atol=1e-6)


def test_slora_with_dp_clips_sparse_and_head_jointly(make_model, sst2_small):
    """Two federations in one pass: sigma = 0 (update norm bounded by the clip) and sigma > 0; both stages."""
    labels = sst2_small["labels"].numpy()
    parts = [dirichlet_label_skew(labels, 2, alpha=1.0, seed=s) for s in (1, 2)]
    q, C, lr = 0.05, 0.05, 0.5
    dp = DPSetup(max_grad_norm=C, sample_rate=q, max_batch=24)
    method = slora(stage1_rounds=1, density=0.01)
    eng = engine_for(method, make_model, sst2_small, parts, seeds=[1, 2], optimizer=dict(SGD, lr=lr), dp=dp,
                     sigmas=[0.0, 0.8])
    start = {k: v.clone() for k, v in eng.global_state.items()}
    plan = eng.plan_round(0)
    sampled, masks = plan.sampled, plan.masks
    info = eng.run_round()
    assert all(torch.isfinite(torch.tensor(info["loss"])))
    names = list(start)                               # sparse values + head: all clipped as one vector
    for r in range(eng.num_replicas):
        f, c = divmod(r, eng.clients_per_round)
        delta = torch.cat([(eng.tensors[n][r] - start[n][f]).flatten() for n in names])
        bound = lr * C * masks[r].sum() / (q * len(parts[f][sampled[f][c]]))   # K steps of sum(clipped) / B
        if f == 0:
            assert 0 < delta.norm() <= bound * (1 + 1e-4)
        else:
            assert delta.norm() > bound                # noise added on top
    info = eng.run_round()                            # stage 2 under DP: LoRA + head
    assert all(torch.isfinite(torch.tensor(info["loss"])))
    assert all(eng.global_state[n + ".lora_B"].norm() > 0 for n in eng.stacked.lora)
    # ledger: stage 1 sends the masked values only (no indices), stage 2 the LoRA factors; head both times
    head = nbytes([eng.global_state[k] for k in ("classifier.weight", "classifier.bias")])
    nnz = sum(start[n].shape[1] for n in start if n.endswith(".sparse"))
    lora = sum(nbytes([eng.global_state[n + k] for k in (".lora_A", ".lora_B")]) for n in eng.stacked.lora)
    for t, payload in enumerate([nnz * 4 + head, lora + head]):
        assert eng.ledger.rounds[t]["up_per_client"] == payload == eng.ledger.rounds[t]["down_per_client"]


# ---------------------------------------------------------------------------------------------- FedAvg-FFT

def test_fedavg_fft_equals_full_finetune_reference(make_model, sst2_small):
    labels = sst2_small["labels"].numpy()
    parts = dirichlet_label_skew(labels, 2, alpha=0.5, seed=0)
    opt = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    method = make_method({"name": "fedavg_fft"}, LORA)
    eng = engine_for(method, make_model, sst2_small, [parts], seeds=[0], optimizer=opt)
    init = {k: v[0].clone() for k, v in eng.global_state.items()}
    for _ in range(2):
        eng.run_round()
    cfg = ReferenceConfig(rounds=2, local_steps=2, batch_size=4, lr=0.05, momentum=0.9, full_finetune=True)
    ref, _ = run_reference(make_model, sst2_small, parts, init, cfg)
    assert set(ref) == set(eng.global_state)
    for n, v in ref.items():
        err = ((eng.global_state[n][0] - v).norm() / v.norm().clamp(min=1e-12)).item()
        assert err < 1e-5, f"{n}: relative error {err:.2e}"
    assert not torch.equal(eng.global_state["bert.encoder.layer.1.output.dense.weight"][0],
                           init["bert.encoder.layer.1.output.dense.weight"])
    bytes_all = nbytes(list(eng.global_state.values()))
    assert eng.ledger.rounds[0]["up_per_client"] == bytes_all == eng.ledger.rounds[0]["down_per_client"]


def test_fedavg_fft_identical_clients_average_to_themselves(make_model, sst2_small):
    labels = sst2_small["labels"].numpy()
    parts = dirichlet_label_skew(labels, 3, alpha=0.5, seed=4)
    method = make_method({"name": "fedavg_fft"}, LORA)
    eng = engine_for(method, make_model, sst2_small, [parts], seeds=[4], optimizer=dict(SGD, lr=0.0), K=1)
    before = {k: v.clone() for k, v in eng.global_state.items()}
    eng.run_round()                                   # lr 0: three identical clients
    for k, v in before.items():
        torch.testing.assert_close(eng.global_state[k], v, rtol=1e-6, atol=1e-9)


def test_full_stacked_per_sample_grads_equal_func_reference(make_model, sst2_small):
    """The DP path of the FFT container (taps on [Rc, b, ...] expanded tensors, nested vmap)."""
    fsm = FullStackedModel(make_model(), 2)
    names = ["classifier.weight", "classifier.bias", "bert.embeddings.LayerNorm.weight",
             "bert.encoder.layer.1.attention.self.query.weight"]
    t = fsm.tensors()
    with torch.no_grad():
        t["classifier.weight"][1] += 0.1              # replica 1 differs from the HF model (= replica 0)
    b = 3
    batch = {k: v[:2 * b, :12] if v.dim() > 1 else v[:2 * b] for k, v in sst2_small.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    st = fsm.state
    st.active, st.batch_size = slice(None), b
    st.buffer = GradBuffer([(n, tuple(t[n].shape[1:])) for n in names], 2, b, True, "cpu")
    F.cross_entropy(fsm(**inputs), batch["labels"], reduction="sum").backward()
    got = st.buffer.unflatten(st.buffer.flat.flatten(0, 1))
    for r in range(2):
        rows = {k: v[r * b:(r + 1) * b] for k, v in batch.items()}
        want = per_sample_grads(fsm.model, {n: t[n][r] for n in names}, rows)
        for n in names:
            torch.testing.assert_close(got[n].view(2, b, *t[n].shape[1:])[r], want[n], rtol=1e-4, atol=1e-6)

"""Engine behaviour beyond equivalence: determinism, the ledger, evaluation, bad input."""
import pytest
import torch

from fedsim.config import load_config
from fedsim.dp import max_poisson_batch
from fedsim.engine import DPSetup
from partitions import dirichlet_label_skew, iid
from tests.helpers import make_engine, rel_err

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}


def test_two_runs_are_bitwise_identical(make_model, sst2_small):
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 4, alpha=0.5, seed=3)
    states = []
    for _ in range(2):
        eng = make_engine(make_model, sst2_small, [parts], seeds=[3], optimizer=SGD, targets=["query", "value"],
                           fraction=0.5, K=2, dp=DPSetup(max_grad_norm=1.0, sample_rate=0.1,
                                                                      max_batch=max_poisson_batch(0.1 * max(map(len, parts)))),
                           sigmas=[0.8])
        eng.run_round()
        eng.run_round()
        states.append(eng.global_state)
    for n in states[0]:
        assert torch.equal(states[0][n], states[1][n]), n


def test_ledger_counts_exact_lora_payload(make_model, sst2_small):
    parts = iid(sst2_small["labels"].numpy(), 4, seed=0)
    eng = make_engine(make_model, sst2_small, [parts], seeds=[0], optimizer=SGD, targets=["query", "value"],
                       fraction=0.5, K=1, rank=4)
    info = eng.run_round()
    hidden, layers, labels, r = 384, 2, 2, 4
    per_client = 4 * (layers * 2 * (r * hidden + hidden * r) + labels * hidden + labels)   # fp32 A, B, head
    assert info["up_bytes"] == [2 * per_client] and info["down_bytes"] == [2 * per_client]   # per federation
    eng.run_round()
    assert eng.ledger.cumulative("up") == [4 * per_client]


def test_evaluate_gives_one_accuracy_per_federation(make_model, sst2_small):
    parts = [iid(sst2_small["labels"].numpy(), 2, seed=s) for s in (0, 1)]
    eng = make_engine(make_model, sst2_small, parts, seeds=[0, 1], optimizer=SGD, targets=["query", "value"],
                       fraction=1.0, K=1)
    evalset = {k: v[:50] for k, v in sst2_small.items()}
    eng.eval_sets, eng.eval_batch_size = {"validation": evalset}, 16
    acc = eng.evaluate()["validation"]
    assert len(acc) == 2 and all(0 <= a <= 1 for a in acc)
    # federation 0's accuracy equals a direct forward of its global model through replica 0 alone
    st = eng.stacked.state
    st.active = slice(0, 1)
    with torch.no_grad():
        logits = eng.stacked(**{k: v for k, v in evalset.items() if k != "labels"})
    assert acc[0] == pytest.approx((logits.argmax(-1) == evalset["labels"]).float().mean().item())


@pytest.mark.parametrize("override,match", [
    ({"lora.rank": 0}, "lora.rank must be >= 1"),
    ({"client_fraction": 0.0}, r"client_fraction must be in \(0, 1\]"),
    ({"client_fraction": 1.5}, r"client_fraction must be in \(0, 1\]"),
    ({"local_steps": 0}, "local_steps"),
    ({"partition": {"name": "dirichlet", "alpha": 0.0}}, "alpha must be a finite number > 0"),
    ({"dp.epsilon": -1}, "epsilon"),
    ({"dp.epsilon": 3, "dp.delta": 1.5}, "delta"),
    ({"dp.epsilon": 3, "dp.max_grad_norm": 0}, "max_grad_norm|C"),
    ({"optimizer.nesterov": True}, "unknown config key"),
    ({"sweep": {"lora.rank": [4, 8]}}, "does not keep tensor shapes"),
])
def test_bad_config_is_rejected_before_compute(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides=override)


def test_bad_experiment_inputs_fail_before_model_loading(tmp_path):
    from fedsim.run import Experiment
    with pytest.raises(ValueError, match="unknown task"):
        Experiment(load_config(overrides={"task": "squad"}))
    with pytest.raises(ValueError, match="unknown method"):
        Experiment(load_config(overrides={"method": {"name": "qfedavg"}}))
    with pytest.raises(ValueError, match="clients"):
        Experiment(load_config(overrides={"task": "rte", "train_subsample": 20, "num_clients": 50,
                                          "partition": {"name": "iid"}}))
    with pytest.raises(ValueError, match="match no nn.Linear"):     # checked before any tokenization
        Experiment(load_config(overrides={"lora.targets": ["qkv"], "num_hidden_layers": 1})).build()


def test_evaluate_uses_each_federations_lora_scale(make_model, sst2_small):
    """Federations that differ only in LoRA alpha share a pass; each is evaluated with its own scale."""
    from fedsim.engine import Federation, build_engine
    from methods import make_method
    parts = iid(sst2_small["labels"].numpy(), 2, seed=0)
    method = make_method({"name": "fedavg_lora"}, {"rank": 4, "alpha": 8.0, "targets": ["query", "value"]})
    feds = [Federation(seed=0, lr=0.1, lora_alpha=a, partitions=parts) for a in (1.0, 64.0)]
    eng = build_engine(method, make_model(), sst2_small, feds, local_steps=1, batch_size=4, client_fraction=1.0,
                       optimizer=SGD)
    eng.run_round()
    gen = torch.Generator().manual_seed(0)           # one SGD step leaves B tiny: make the adapters matter
    for n in [n for n in eng.global_state if n.endswith(".lora_B")]:
        eng.global_state[n] = 0.05 * torch.randn(eng.global_state[n].shape, generator=gen)
    scales = [layer.scale.clone() for layer in eng.stacked.lora.values()]
    evalset = {k: v[:24] for k, v in sst2_small.items()}
    eng.eval_sets, eng.eval_batch_size = {"validation": evalset}, 24
    eng.evaluate()
    for layer, before in zip(eng.stacked.lora.values(), scales):
        assert torch.equal(layer.scale, before)                  # training scales restored afterwards
    # federation 1 evaluated through replica 1 must use alpha 64 / r: its eval logits must equal a direct
    # forward of its global model on replica 2 (which trains with alpha 64), and differ from one at alpha 1
    seen = []
    entry = "forward_packed" if eng.stacked.runs_packed_tokens else "forward"   # packed: vs the padded direct forward
    forward = getattr(eng.stacked, entry)
    setattr(eng.stacked, entry, lambda *a, **kw: seen.append(forward(*a, **kw)) or seen[-1])
    eng.evaluate()
    delattr(eng.stacked, entry)
    fed1 = seen[0][24:]                                          # rows are federation-major: 24 per federation
    by_length = evalset["attention_mask"].sum(1).argsort(stable=True)   # ... in order of length
    st = eng.stacked.state
    direct = {}
    with torch.no_grad():
        for r in (0, 2):                                         # replica 0: alpha 1, replica 2: alpha 64
            for name, g in eng.global_state.items():
                eng.tensors[name][r].copy_(g[1])
            st.active = slice(r, r + 1)
            direct[r] = eng.stacked(**{k: v for k, v in evalset.items() if k != "labels"})
    torch.testing.assert_close(fed1, direct[2][by_length], rtol=1e-5, atol=1e-6)
    assert (fed1 - direct[0][by_length]).abs().max() > 1e-3
    assert scales[0][0].item() == pytest.approx(1.0 / 4) and scales[0][2].item() == pytest.approx(64.0 / 4)


@pytest.mark.parametrize("method", ["fedavg_lora", "slora", "fedavg_fft"])
def test_packed_poisson_pass_equals_padded_pass(make_model, sst2_small, method, monkeypatch):
    """Ragged Poisson batches run only their real rows through the backbone; the result must equal running
    every padded slot (empty slots masked out), per-sample gradients and noise included."""
    from fedsim.stacked import _StackedState
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 3, alpha=1.0, seed=4)
    kw = dict(seeds=[4], optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0}, targets=["query", "value"],
              fraction=1.0, K=2, method=method, dp=DPSetup(max_grad_norm=0.5, sample_rate=0.1,
                                                                 max_batch=max_poisson_batch(0.1 * max(map(len, parts)))),
              sigmas=[0.6])
    packed_rows = []
    pack = _StackedState.pack

    def spy(self, mask):
        pack(self, mask)
        if self.slots is not None:
            packed_rows.append((len(self.slots), self.num_slots))
    monkeypatch.setattr(_StackedState, "pack", spy)
    eng = make_engine(make_model, sst2_small, [parts], **kw)
    eng.run_round()
    assert packed_rows and all(n < slots for n, slots in packed_rows)      # packing really happened
    monkeypatch.setattr(_StackedState, "pack", lambda self, mask: pack(self, None))   # every slot runs
    ref = make_engine(make_model, sst2_small, [parts], **kw)
    ref.run_round()
    for n, v in ref.global_state.items():
        torch.testing.assert_close(eng.global_state[n], v, rtol=1e-5, atol=1e-6, msg=n)


def test_length_groups_cover_every_row_once_with_fewest_slots():
    """Groups partition the rows into consecutive length ranges, and no split into at most G such ranges
    computes fewer token slots (brute force over every set of cut points)."""
    import itertools
    from fedsim.packed import length_groups
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        lengths = torch.randint(1, 12, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen)
        for G in (1, 2, 3, 4):
            groups = length_groups(lengths, G)
            assert 1 <= len(groups) <= G
            assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
            maxes = [int(lengths[g].max()) for g in groups]
            assert maxes == sorted(maxes) and all(int(lengths[g].min()) > m for g, m in zip(groups[1:], maxes))
            slots = sum(len(g) * m for g, m in zip(groups, maxes))
            values = sorted(set(lengths.tolist()))
            best = min(sum(int((lengths <= values[j]).sum() - (lengths <= (values[i - 1] if i else 0)).sum()) * values[j]
                           for i, j in zip((0,) + tuple(c + 1 for c in cuts), cuts + (len(values) - 1,)))
                       for n in range(min(G, len(values))) for cuts in itertools.combinations(range(len(values) - 1), n))
            assert slots == best, (trial, G)


@pytest.mark.parametrize("method,private", [("fedavg_lora", False), ("fedavg_lora", True), ("slora", True),
                                            ("ffa_lora", True)])
def test_length_grouped_step_equals_one_padded_pass(make_model, sst2_small, method, private, monkeypatch):
    """A step run as several passes grouped by length (one backward) gives the same update as one pass over
    all rows padded to the longest: per-sample gradients, clipping and noise included. (The padded forward's
    path: a backbone without a packed forward.)"""
    import fedsim.engine as engine
    parts = iid(sst2_small["labels"].numpy(), 2, seed=1)
    dp = DPSetup(max_grad_norm=0.5, sample_rate=0.1, max_batch=max_poisson_batch(0.1 * max(map(len, parts)))) \
        if private else None
    kw = dict(seeds=[2, 3], optimizer=SGD, targets=["query", "value"], fraction=1.0, K=2, b=8, method=method, dp=dp,
              sigmas=[0.7, 0.7] if private else None, packed_tokens=False)
    calls = []
    trim = engine._trim
    monkeypatch.setattr(engine, "_trim", lambda inputs: calls.append(trim(inputs)["input_ids"].shape) or trim(inputs))
    grouped = make_engine(make_model, sst2_small, [parts, parts], **kw)
    grouped.run_round()
    assert len(calls) > 2 * 2 and len({t for _, t in calls}) > 1      # several passes per step, different lengths
    monkeypatch.setattr(engine, "MAX_LENGTH_GROUPS", 1)
    single = make_engine(make_model, sst2_small, [parts, parts], **kw)
    single.run_round()
    for n, v in single.global_state.items():
        torch.testing.assert_close(grouped.global_state[n], v, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("method,private,pooling", [
    ("fedavg_lora", False, "mean"), ("fedavg_lora", True, "mean"), ("slora", True, "mean"), ("ffa_lora", True, "mean"),
    ("sa_fedlora", False, "mean"), ("fedavg_lora", False, "cls"),
    ("fedavg_fft", False, "mean"), ("fedavg_fft", False, "cls"), ("fedavg_fft", True, "mean")])
def test_packed_token_step_equals_padded_step(make_model, sst2_small, method, private, pooling):
    """The backbone on packed real tokens (fedsim.packed) gives the same round as the padded, length-grouped
    forward: ragged lengths, per-sample gradients, clipping and noise included; and the same evaluation.
    Full fine-tuning: every weight per replica (replica modules) against the vmap pass; under DP it trains
    through vmap either way and evaluates packed."""
    parts = dirichlet_label_skew(sst2_small["labels"].numpy(), 3, alpha=1.0, seed=5)
    dp = DPSetup(max_grad_norm=0.5, sample_rate=0.1, max_batch=max_poisson_batch(0.1 * max(map(len, parts)))) \
        if private else None
    kw = dict(seeds=[6, 7], optimizer=SGD, targets=["query", "value"], fraction=2 / 3, K=2, b=8, method=method,
              dp=dp, sigmas=[0.7, 0.7] if private else None, chunk=3)
    model = lambda: make_model(pooling=pooling)                      # noqa: E731
    engines = [make_engine(model, sst2_small, [parts, parts], packed_tokens=p, **kw) for p in (True, False)]
    assert engines[0].stacked.runs_packed_tokens and not engines[1].stacked.runs_packed_tokens
    lengths = sst2_small["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() // 2                       # really ragged rows
    evalset = {k: v[:40] for k, v in sst2_small.items()}
    accs = []
    for eng in engines:
        eng.run_round()
        eng.run_round()
        eng.eval_sets, eng.eval_batch_size = {"validation": evalset}, 16
        accs.append(eng.evaluate()["validation"])
    for n, v in engines[1].global_state.items():
        torch.testing.assert_close(engines[0].global_state[n], v, rtol=1e-5, atol=1e-6, msg=n)
    assert accs[0] == accs[1]


@pytest.mark.parametrize("method,private", [("fedavg_lora", True), ("fedavg_lora", False), ("fedavg_fft", False)])
def test_bf16_precision_runs_the_backbone_in_bf16_and_keeps_trained_tensors_fp32(make_model, sst2_small, method,
                                                                                  private):
    """precision=bf16 autocasts the frozen backbone's matmuls only: the round's update differs from fp32's
    (so autocast is really on) by no more than bf16 rounding, and every trained tensor stays fp32. SGD, so
    the update is the gradients' sum (AdamW's first steps move by lr times the sign of the gradient, which
    turns rounding of near-zero coordinates into whole steps)."""
    parts = iid(sst2_small["labels"].numpy(), 2, seed=0)
    dp = DPSetup(max_grad_norm=1.0, sample_rate=0.1, max_batch=max_poisson_batch(0.1 * max(map(len, parts)))) \
        if private else None
    updates = {}
    for precision in ("fp32", "bf16"):
        eng = make_engine(make_model, sst2_small, [parts], seeds=[0], optimizer={"name": "sgd", "lr": 0.1},
                           targets=["query", "value"], fraction=1.0, K=2, method=method, dp=dp,
                           sigmas=[0.5] if private else None, precision=precision)
        start = {n: v.clone() for n, v in eng.global_state.items()}
        eng.run_round()
        assert all(v.dtype == torch.float32 for v in eng.global_state.values())
        updates[precision] = {n: eng.global_state[n] - start[n] for n in start}
    # tensors whose true gradient is zero (attention's key bias: softmax ignores a constant added to every
    # score) move by rounding noise alone in both precisions; a relative error says nothing about them
    moved = {n: u for n, u in updates["fp32"].items() if u.norm() > 1e-6 * start[n].norm().clamp(min=1.0)}
    errs = {n: rel_err(updates["bf16"][n], u) for n, u in moved.items()}
    assert max(errs.values()) > 0, "bf16 changed nothing: autocast is not reaching the backbone"
    assert max(errs.values()) < 0.05, sorted(errs.items(), key=lambda kv: -kv[1])[:4]


def test_precision_auto_is_bf16_on_cuda_only():
    from fedsim.engine import resolve_precision
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")

"""The round loop: every sampled client of every federation trains in one batched pass.

Replicas are (federation, client) pairs, replica r = f * clients_per_round + j for the j-th sampled client
of federation f. Per round: broadcast each federation's global state to its replicas, run the local steps for all
replicas at once (in chunks of replicas when memory is short), aggregate per federation, log bytes,
evaluate every N rounds.

All randomness comes from generators keyed by the federation's seed and purpose (round, client, local
step), never by the federation's position in the pass: a federation trains exactly as it would alone,
and the sweep variants of one seed see the same clients, batches, Poisson masks and standard-normal
noise draws (each scaled by its own sigma), so a sweep is a comparison under common random numbers.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedsim.containers import build_container
from fedsim.dp import adapt_clip, add_update_noise, clip_and_noise, clip_updates, update_noise_multiplier
from fedsim.grads import GradBuffer
from fedsim.ledger import Ledger
from fedsim.optim import make_optimizer
from fedsim.packed import MAX_LENGTH_GROUPS, length_groups, pack
from fedsim.evaluation import global_accuracy, personal_accuracy
from fedsim.plan import index_rows, plan_round
from fedsim.sampling import clients_per_round
from fedsim.server_optimizers import make_server_optimizer


# A federation whose mean training loss exceeds this many times the loss of guessing uniformly (ln of the
# number of labels) has diverged even if every number is still finite (AdamW at a huge learning rate keeps
# weights finite while the loss reaches 1e6): no healthy run gets there, since it starts near 1x.
DIVERGED_LOSS_FACTOR = 100.0


def diverged_loss(stacked):
    """The training loss above which a federation has diverged: DIVERGED_LOSS_FACTOR x ln(labels), the loss of
    uniform guessing over the model's labels (its config's num_labels: a two-layer head's first layer is as wide
    as the hidden size, not the label count)."""
    return DIVERGED_LOSS_FACTOR * math.log(max(stacked.num_labels, 2))


@dataclass
class Federation:
    """One independent federation sharing the pass; variants keep tensor shapes."""
    seed: int
    lr: float
    lora_alpha: float
    noise_multiplier: float = 0.0
    partitions: list = field(default_factory=list)     # index arrays, one per client
    max_grad_norm: float | None = None                  # DP clip norm C; None = DPSetup's
    variant: dict = field(default_factory=dict)         # its sweep values ({} outside a sweep), as reported
    personal_eval: list = field(default_factory=list)   # per client: rows held out of its data (evaluate_personal)
    server_lr: float = 1.0                              # the server optimizer's learning rate (1: FedAvg's step)


@dataclass
class DPSetup:
    max_grad_norm: float
    sample_rate: float              # Poisson q, the same for every client
    max_batch: int                  # static padded batch
    head_share: float | None = None  # per-group clipping: the head's share of C^2 (None: joint clipping)


def _trim(inputs):
    """Cut the sequence to the longest real sample in the batch (same math: padding is masked)."""
    T = int(inputs["attention_mask"].sum(1).max())
    return {k: v[:, :T] for k, v in inputs.items()}


def build_engine(method, model, train, federations, *, client_fraction, device="cpu", packed_tokens=True, **kw):
    """The one way to put an engine together: the method's replica container (method.container()) for the
    federations' replicas, R = len(federations) x clients per round, on `device`, then the engine.
    packed_tokens=False: the padded forward even where a packed one exists (tests compare the two);
    kw: FederatedEngine's keyword arguments."""
    replicas = len(federations) * clients_per_round(len(federations[0].partitions), client_fraction)
    stacked = build_container(method, model, replicas, packed_tokens=packed_tokens).to(device)
    return FederatedEngine(stacked, method, train, federations, client_fraction=client_fraction, device=device, **kw)


class FederatedEngine:
    """F federations x clients_per_round replicas trained in one batched pass (build it with build_engine).
    Per round: the method's schedule (on_round_start), a RoundPlan, every chunk's local steps, aggregation of
    what is shared, client-local state kept per client id, the byte ledger; evaluate() scores the global models."""

    def __init__(self, stacked, method, train, federations, *, local_steps, batch_size, client_fraction,
                 optimizer, dp=None, replica_chunk=None, device="cpu", eval_sets=None, eval_batch_size=128,
                 precision="auto", server=None, client_dp=None):
        self.stacked, self.method, self.train = stacked, method, train
        self.federations, self.local_steps, self.batch_size = federations, local_steps, batch_size
        self.fraction, self.opt_cfg, self.dp, self.device = client_fraction, dict(optimizer), dp, torch.device(device)
        self.eval_sets, self.eval_batch_size = eval_sets or {}, eval_batch_size
        self.precision = resolve_precision(precision, device)
        self.train_lengths = train["attention_mask"].sum(1)     # real tokens per row: length groups of each step
        self.num_clients = len(federations[0].partitions)
        self.clients_per_round = clients_per_round(self.num_clients, client_fraction)
        self.num_replicas = len(federations) * self.clients_per_round
        if stacked.num_replicas != self.num_replicas:
            raise ValueError(f"stacked model has {stacked.num_replicas} replicas, engine needs {self.num_replicas}")
        self.chunk = min(replica_chunk or self.num_replicas, self.num_replicas)
        self.dtype = stacked.heads[next(iter(stacked.heads))].weight.dtype
        per_client = self.clients_per_round
        rep = lambda vals: torch.tensor(vals, dtype=self.dtype, device=device).repeat_interleave(per_client)  # noqa
        self.lr = rep([f.lr for f in federations])
        self.sigma = rep([f.noise_multiplier for f in federations])
        if dp is not None:
            self.clip = rep([dp.max_grad_norm if f.max_grad_norm is None else f.max_grad_norm for f in federations])
        for layer in stacked.lora.values():
            layer.scale.copy_(rep([f.lora_alpha / stacked.rank for f in federations]))
        self._apply(method.init_global(self.layout(), [f.seed for f in federations]))   # may add tensors
        # client-local tensors (fedsim.interface.Method.client_local): {name: [F, num_clients, *shape]}, by client id
        self.client_state = {}
        self.head_names = [f"{h}.{p}" for h in stacked.heads for p in ("weight", "bias")]   # per-group clipping
        self.ledger = Ledger(len(federations))
        # the server's step on each round's aggregate (fedsim/server_optimizers.py); server: the config's
        # server section (optimizer name and its betas, tau), None = FedAvg
        # client-level DP (fedsim.dp.ClientDPSetup; dp is then None: clients train without per-sample noise):
        # each federation's current update clip C [F] and the update's noise multiplier [F]
        self.client_dp = client_dp
        if client_dp is not None:
            self.update_clip = torch.full((len(federations),), client_dp.max_update_norm, dtype=self.dtype,
                                          device=self.device)
            count = client_dp.count_stddev if client_dp.target_quantile is not None else None
            self.update_sigma = torch.tensor([update_noise_multiplier(f.noise_multiplier, count) for f in federations],
                                             dtype=self.dtype, device=self.device)
        server = dict(server or {"optimizer": "fedavg"})
        server_lr = torch.tensor([f.server_lr for f in federations], dtype=self.dtype)
        self.server_opt = make_server_optimizer(server.pop("optimizer"), server_lr, **server)
        self.round_idx = 0
        # federation index -> {"round": 1-based round, "reason": str}. A failed federation is frozen at its
        # last finite global state (its replicas keep running, so shapes never change, but its updates are
        # discarded); the others train on, unaffected: no computation mixes replicas.
        self.failed = {}

    def _autocast(self):
        """The backbone's forward in bf16 when asked (adapters and head stay fp32, see stacked._full_precision)."""
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _packed_tokens(self):
        return getattr(self.stacked, "runs_packed_tokens", False)

    def _forward(self, inputs):
        """Logits of the selected rows: their real tokens packed (fedsim.packed) where the model can, else the
        padded rows trimmed to the longest."""
        if self._packed_tokens():
            batch = pack(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
            st = self.stacked.state
            st.select_tokens(batch, len(range(*st.active.indices(self.num_replicas))))
            return self.stacked.forward_packed(batch)
        return self.stacked(**_trim(inputs))

    # ------------------------------------------------------------------ one round
    def run_round(self):
        """One round for every federation. Returns per-federation losses (None where not finite), bytes and
        `failed`: {federation: reason} for federations that failed in this round."""
        t = self.round_idx
        already_failed = set(self.failed)
        self._apply(self.method.on_round_start(t, self.global_state, self.layout()))
        last_finite = dict(self.global_state)                  # aggregation makes new tensors; these stay
        plan = self.plan_round(t)
        self.begin_round(plan)
        losses = torch.zeros(self.num_replicas)
        opt = make_optimizer(self.opt_cfg, self.lr)
        for r0 in range(0, self.num_replicas, self.chunk):
            rs = slice(r0, min(r0 + self.chunk, self.num_replicas))
            for s in range(self.local_steps):
                losses[rs] += self.local_step(plan, s, rs, opt)
        clip = self.update_clip.tolist() if self.client_dp is not None else None    # this round's, before adapting
        self._aggregate(plan)
        per_fed = (losses / self.local_steps).view(len(self.federations), self.clients_per_round).mean(1)
        self._freeze_failed(t, per_fed, last_finite)
        self._store_client_state(plan)
        self.ledger.record(t, self.clients_per_round, *self.method.payload_bytes(self.global_state, plan))
        self.round_idx += 1
        loss = [x if math.isfinite(x) and f not in self.failed else None for f, x in enumerate(per_fed.tolist())]
        sent = self.ledger.rounds[-1]
        return dict(round=t, loss=loss, up_bytes=sent["up"], down_bytes=sent["down"],     # per federation
                    cum_up_bytes=self.ledger.cumulative("up"), cum_down_bytes=self.ledger.cumulative("down"),
                    failed={f: v["reason"] for f, v in self.failed.items() if f not in already_failed},
                    update_clip=clip)

    def plan_round(self, t):
        """The RoundPlan of round t (fedsim/plan.py; no compute)."""
        shapes = {name: tuple(p.shape[1:]) for name, p in self.tensors.items()}
        return plan_round(t, self.federations, self.method, shapes, client_fraction=self.fraction,
                          local_steps=self.local_steps, batch_size=self.batch_size, dp=self.dp, device=self.device,
                          dtype=self.dtype)

    @torch.no_grad()
    def begin_round(self, plan):
        """Replicas take their federation's global state and their client's own client-local tensors; the
        trained tensors require gradients."""
        for name, g in self.global_state.items():
            self.tensors[name].copy_(g.repeat_interleave(self.clients_per_round, 0))
        self._load_client_state(plan)
        for name, p in self.tensors.items():
            if name in plan.client_masks:        # slots a client does not hold start at zero (HetLoRA's rank)
                p.mul_(plan.client_masks[name])
            p.requires_grad_(name in plan.trained)

    def _replica_index(self, plan):
        """(federation, client id) of every replica, as index tensors [R]."""
        feds, clients = plan.clients_of()
        return feds.to(self.device), clients.to(self.device)

    def _load_client_state(self, plan):
        """Each replica gets its client's own copy of the client-local tensors (the global value on first use)."""
        feds, clients = self._replica_index(plan)
        for name in plan.client_local:
            if name not in self.client_state:
                g = self.global_state[name]
                self.client_state[name] = g[:, None].expand(g.shape[0], self.num_clients, *g.shape[1:]).clone()
            self.tensors[name].copy_(self.client_state[name][feds, clients])

    @torch.no_grad()
    def _store_client_state(self, plan):
        """The sampled clients keep what they trained; a failed federation's clients keep their last copy."""
        feds, clients = self._replica_index(plan)
        healthy = torch.tensor([f not in self.failed for f, _ in plan.client_ids], device=self.device)
        for name in plan.client_local:
            self.client_state[name][feds[healthy], clients[healthy]] = self.tensors[name].detach()[healthy]

    def layout(self):
        """What the method may read of the container (fedsim.interface.Layout)."""
        return self.stacked.layout(len(self.federations))

    def _apply(self, change):
        """Carry out a method's fedsim.interface.Change: the container first (a new rank, scales or sparse deltas
        reshape its tensors), then the new global state."""
        self.stacked.apply(change, self.clients_per_round)
        self.global_state = {k: v.to(self.device, self.dtype) for k, v in change.global_state.items()}
        self.tensors = self.stacked.tensors()

    def _fail(self, federation, t, reason):
        if federation not in self.failed:
            self.failed[federation] = {"round": t + 1, "reason": reason}

    def _freeze_failed(self, t, per_fed_loss, last_finite):
        """Mark federations whose loss or new global state is non-finite as failed; put every failed one back
        to its last finite state."""
        F_ = len(self.federations)
        finite = torch.ones(F_, dtype=torch.bool, device=self.device)
        for v in self.global_state.values():
            finite &= torch.isfinite(v.reshape(F_, -1)).all(1)
        exploded = diverged_loss(self.stacked)
        for f, ok in enumerate(finite.tolist()):
            loss = float(per_fed_loss[f])
            if not math.isfinite(loss):
                self._fail(f, t, f"non-finite training loss in round {t + 1}")
            elif loss > exploded:
                self._fail(f, t, f"training loss {loss:.3g} in round {t + 1} exceeds {DIVERGED_LOSS_FACTOR:g} x the "
                                 f"loss of uniform guessing ({exploded:.3g})")
            elif not ok:
                self._fail(f, t, f"non-finite update of the global model in round {t + 1}")
        if self.failed:
            frozen = torch.tensor(sorted(self.failed), device=self.device)
            self.global_state = {n: v.index_copy(0, frozen, last_finite[n][frozen]) for n, v in self.global_state.items()}

    def local_step(self, plan, s, rs, opt):
        """Local step s of the replicas rs (a chunk) of the plan's round; returns their mean losses [Rc]."""
        t, rows, mask, client_ids, trainable = plan.round, plan.rows[rs, s], plan.masks[rs, s], plan.client_ids[rs], \
            plan.trained
        st = self.stacked.state
        if self.dp is not None:   # drop padding slots no replica of this chunk uses (real samples come first)
            keep = max(1, int(mask.sum(1).max()))
            rows, mask = rows[:, :keep], mask[:, :keep]
        Rc, b = rows.shape
        per_sample = self.dp is not None
        specs = [(n, tuple(self.tensors[n].shape[1:])) for n in trainable]
        st.begin_pass(rs, b, GradBuffer(specs, Rc, b, per_sample, self.device, self.dtype, head_names=self.head_names,
                                        head_share=self.dp.head_share if per_sample else None))
        real = mask.reshape(-1)                        # on the CPU, like rows
        mask = mask.to(self.device)
        st.pack(mask)                                  # ragged Poisson batches: the backbone runs real rows only
        run_rows = rows.reshape(-1) if st.slots is None else rows.reshape(-1)[real]
        slots = st.slots if st.slots is not None else torch.arange(Rc * b, device=self.device)
        # packed tokens: one pass of real tokens. Otherwise the rows run as a few passes grouped by length, one
        # backward for all (containers that run every slot in each pass, like full fine-tuning's vmap, take one)
        if self._packed_tokens():
            groups = [torch.arange(len(run_rows))]
        else:
            groups = length_groups(self.train_lengths[run_rows],
                                   MAX_LENGTH_GROUPS if getattr(self.stacked, "runs_packed_rows", False) else 1)
        ce_parts = []
        for group in groups:
            st.select(slots[group.to(self.device)], Rc * b)
            inputs, labels = index_rows(self.train, run_rows[group], self.device)
            with self._autocast():
                logits = self._forward(inputs)
            ce_parts.append(F.cross_entropy(logits.to(self.dtype), labels, reduction="none"))  # bf16 -> fp32
        ce = torch.cat(ce_parts)
        ce = ce.new_zeros(Rc * b).index_copy(0, slots[torch.cat(groups).to(self.device)], ce).view(Rc, b)  # 0: empty slot
        if per_sample:   # sum of per-sample losses: the per-sample gradients are those of each sample's loss
            loss = (ce * mask).sum()
        else:
            loss = ce.mean(1).sum()
        loss.backward()
        buf = st.end_pass()
        # a tensor marked trained that no layer differentiates would silently never move: a method bug
        if buf.missing():
            raise RuntimeError(f"{self.method.name}: tensors marked trained got no gradient from the replica "
                               f"container: {buf.missing()[:3]}; the method's trained() must leave them out")
        if per_sample:
            broken = ~torch.isfinite(buf.sq_norms).all(1)         # [Rc]: clipping would hide an inf as a 0
            if bool(broken.any()):
                for r in broken.nonzero().flatten().tolist():
                    f, c = client_ids[r]
                    self._fail(f, t, f"non-finite per-sample gradient in round {t + 1} (client {c}, local step {s + 1})")
                buf.flat[broken] = 0.0                             # the federation is frozen; keep its lanes finite
                buf.sq_norms[broken] = 0.0
            expected = plan.expected_batch[rs]
            keys = [(self.federations[i].seed, "noise", t, c, s) for i, c in client_ids]
            grouped = buf.groups is not None
            grads = buf.unflatten(clip_and_noise(buf.flat, self.clip[rs], self.sigma[rs], expected, keys,
                                                 sq_norms=buf.group_sq_norms if grouped else buf.sq_norms,
                                                 groups=buf.groups))
        else:
            grads = buf.summed
        # replica r = f * clients_per_round + j: the j-th sampled client of federation f
        fed_of = torch.arange(rs.start, rs.stop, device=self.device) // self.clients_per_round
        for name in trainable:
            # the global per replica is built only if asked for: for full fine-tuning it is a copy of every weight
            regularizer = self.method.local_regularizer_grad(name, self.tensors[name][rs],
                                                             lambda name=name: self.global_state[name][fed_of], t,
                                                             client_ids, lambda other: self.tensors[other][rs])
            if regularizer is not None:
                grads[name] = grads[name] + regularizer
            if name in plan.client_masks:    # slots a client does not hold stay zero (DP noise included)
                grads[name] = grads[name] * plan.client_masks[name][rs]
        opt.step(self.tensors, grads, rs)
        with torch.no_grad():
            for name in trainable:
                drift = self.method.local_step_correction(name, t, client_ids)
                if drift is not None:      # a move after the optimizer's step (SCAFFOLD), held slots only
                    p = self.tensors[name][rs]
                    drift = drift * plan.client_masks[name][rs] if name in plan.client_masks else drift
                    p.sub_(opt.lr[rs].to(p).view(-1, *([1] * (p.dim() - 1))) * drift)
            per_replica = (ce.detach() * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_replica.cpu()

    def _aggregate(self, plan):
        num_federations, per_federation = len(self.federations), self.clients_per_round
        sizes = torch.tensor([[len(f.partitions[c]) for c in cl] for f, cl in zip(self.federations, plan.sampled)],
                             dtype=self.dtype, device=self.device)
        weights = sizes / sizes.sum(1, keepdim=True)
        clients = {n: self.tensors[n].detach().view(num_federations, per_federation, *self.tensors[n].shape[1:])
                   for n in plan.shared}
        if self.client_dp is not None:      # client-level DP: clipped updates, equal weights, noise on the average
            clients, norms = clip_updates(self.global_state, clients, self.update_clip)
            weights = torch.full_like(weights, 1.0 / per_federation)
        aggregated = self.method.aggregate(self.global_state, clients, weights, plan)
        if self.client_dp is not None:
            seeds = [f.seed for f in self.federations]
            std = self.update_sigma * self.update_clip / per_federation
            aggregated = add_update_noise(aggregated, plan.shared, std, [(s, "update_noise", plan.round) for s in seeds])
            if self.client_dp.target_quantile is not None:
                self.update_clip = adapt_clip(self.update_clip, norms, self.client_dp,
                                              [(s, "clip_count_noise", plan.round) for s in seeds])
        self.global_state = self.server_opt.step(self.global_state, aggregated, plan.shared)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """Everything a resumed run needs: randomness is keyed by round, optimizers reset every round."""
        return {"round": self.round_idx, "global": {k: v.cpu() for k, v in self.global_state.items()},
                "client_state": {k: v.cpu() for k, v in self.client_state.items()},
                "ledger": self.ledger.state_dict(), "method": self.method.state_dict(), "failed": self.failed,
                "server_optimizer": self.server_opt.state_dict(),
                "update_clip": self.update_clip.cpu() if self.client_dp is not None else None}

    def load_state_dict(self, d):
        self.round_idx = d["round"]
        self.failed = {int(f): v for f, v in d.get("failed", {}).items()}
        self.global_state = {k: v.to(self.device) for k, v in d["global"].items()}
        self.client_state = {k: v.to(self.device) for k, v in d.get("client_state", {}).items()}
        self.ledger = Ledger.from_state_dict(d["ledger"])
        self.method.load_state_dict(d["method"])
        self.server_opt.load_state_dict(d.get("server_optimizer", {}), self.device)
        if self.client_dp is not None:
            self.update_clip = d["update_clip"].to(self.device)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, splits=None):
        """Accuracy of each federation's global model on every eval split (or on those named):
        {split: [F accuracies]}."""
        return global_accuracy(self, splits)

    def evaluate_personal(self):
        """Each client's own model on its held-out rows (fedsim.evaluation.personal_accuracy), or None."""
        return personal_accuracy(self)


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision, device):
    """fp32 or bf16 (the frozen backbone's matmuls under bf16 autocast). auto: bf16 on CUDA, fp32 elsewhere.
    bf16 on a CPU pays only where the CPU has native bf16 matmuls (AVX512-BF16 or AMX): about 3x a fp32
    matmul at the backbone's shapes there, slower than fp32 without them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (got {precision!r})")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision

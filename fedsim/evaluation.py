"""Evaluation: the global model of each federation on the eval splits, and each client's own model (shared
tensors with its client-local ones) on the rows held out of its own data. Both run replicas side by side in
the engine's batched pass, with nothing trained.
"""
import torch

from fedsim.plan import index_rows


@torch.no_grad()
def global_accuracy(engine, splits=None):
    """Accuracy of each federation's global model on every eval split (or on the named ones):
    {split: [F accuracies]}."""
    F_ = len(engine.federations)
    for name, g in engine.global_state.items():          # replicas 0..F-1 hold the global models
        engine.tensors[name][:F_].copy_(g)
    for layer in engine.stacked.lora.values():           # ... with their federation's LoRA scale
        layer.scale[:F_] = layer.scale[::engine.clients_per_round].clone()
    st = engine.stacked.state
    # as many federations per forward as a training chunk holds whole ones (at least one): with chunks
    # inside a federation, each federation is evaluated alone, exactly as in its solo run
    per_pass = max(1, engine.chunk // engine.clients_per_round)
    out = {}
    for split, data in engine.eval_sets.items():
        if splits is not None and split not in splits:
            continue
        correct = torch.zeros(F_)
        n = len(data["labels"])
        by_length = data["attention_mask"].sum(1).argsort(stable=True)   # batches of similar length: less padding
        for f0 in range(0, F_, per_pass):
            fs = slice(f0, min(f0 + per_pass, F_))
            st.begin_pass(fs)
            for i in range(0, n, engine.eval_batch_size):
                idx = by_length[i: i + engine.eval_batch_size]
                rows = idx.repeat(fs.stop - fs.start)         # every federation sees the same rows
                inputs, labels = index_rows(data, rows, engine.device)
                st.select(None, None)
                with engine._autocast():
                    logits = engine._forward(inputs)
                correct[fs] += (logits.argmax(-1) == labels).view(fs.stop - fs.start, -1).sum(1).float().cpu()
        out[split] = (correct / n).tolist()
    st.end_pass()
    for layer in engine.stacked.lora.values():
        layer.scale.copy_(layer.scale[:F_].repeat_interleave(engine.clients_per_round))
    return out


@torch.no_grad()
def personal_accuracy(engine):
    """Each client's own model -- its federation's global tensors with its own client-local ones -- on the
    rows held out of its own data (Federation.personal_eval). Returns (accuracy over all held-out rows of
    each federation [F], accuracy of each client [F][num_clients], None where a client holds none), or None
    when no client holds rows. Clients run side by side in the replica slots, a chunk at a time."""
    pairs = [(f, c) for f, fed in enumerate(engine.federations) for c, rows in enumerate(fed.personal_eval)
             if len(rows)]
    if not pairs:
        return None
    st, per_client = engine.stacked.state, engine.clients_per_round
    scales = [layer.scale.clone() for layer in engine.stacked.lora.values()]
    correct = torch.zeros(len(engine.federations), engine.num_clients)
    total = torch.zeros_like(correct)
    for i in range(0, len(pairs), engine.chunk):
        group = pairs[i:i + engine.chunk]
        feds = torch.tensor([f for f, _ in group], device=engine.device)
        clients = torch.tensor([c for _, c in group], device=engine.device)
        for name, p in engine.tensors.items():
            if name in engine.client_state:
                p[:len(group)] = engine.client_state[name][feds, clients]
            elif name in engine.global_state:
                p[:len(group)] = engine.global_state[name][feds]
        for layer, scale in zip(engine.stacked.lora.values(), scales):
            layer.scale[:len(group)] = scale[feds * per_client]          # each slot its federation's scale
        st.begin_pass(slice(0, len(group)))
        held = [torch.as_tensor(engine.federations[f].personal_eval[c]) for f, c in group]
        for j in range(0, max(map(len, held)), engine.eval_batch_size):
            block = [h[j:j + engine.eval_batch_size] for h in held]
            b = max(map(len, block))
            mask = torch.stack([torch.arange(b) < len(x) for x in block])          # [g, b] real rows
            rows = torch.cat(block)                                              # replica-major, like slots
            slots = mask.reshape(-1).nonzero().squeeze(1)
            st.select(slots.to(engine.device), len(group) * b)
            inputs, labels = index_rows(engine.train, rows, engine.device)
            with engine._autocast():
                hits = (engine._forward(inputs).argmax(-1) == labels).float().cpu()
            where = (feds.cpu()[slots // b], clients.cpu()[slots // b])        # each row's (federation, client)
            correct.index_put_(where, hits, accumulate=True)
            total.index_put_(where, torch.ones_like(hits), accumulate=True)
    st.end_pass()
    for layer, scale in zip(engine.stacked.lora.values(), scales):
        layer.scale.copy_(scale)
    overall = (correct.sum(1) / total.sum(1).clamp(min=1)).tolist()
    each = [[(correct[f, c] / total[f, c]).item() if total[f, c] else None for c in range(engine.num_clients)]
            for f in range(len(engine.federations))]
    return overall, each


def personal_majority_accuracy(labels, federations):
    """The local majority-label baseline of personalized accuracy: each client predicts the most frequent label
    of its own training rows (Federation.partitions; the smallest label id on a tie) on the rows held out of its
    data (Federation.personal_eval). A personalized method that does not beat it has learned no more than each
    client's label skew. labels: the training split's label ids [N]. Returns (accuracy over all held-out rows
    of each federation [F], accuracy of each client [F][num_clients], None where a client holds none), or None
    when no client holds rows (the format of personal_accuracy)."""
    labels = torch.as_tensor(labels)
    if not any(len(rows) for fed in federations for rows in fed.personal_eval):
        return None
    overall, each = [], []
    for fed in federations:
        hits, total, mine = 0, 0, []
        for train, held in zip(fed.partitions, fed.personal_eval):
            if not len(held):
                mine.append(None)
                continue
            majority = torch.bincount(labels[torch.as_tensor(train)]).argmax()
            right = int((labels[torch.as_tensor(held)] == majority).sum())
            hits, total = hits + right, total + len(held)
            mine.append(right / len(held))
        overall.append(hits / max(total, 1))
        each.append(mine)
    return overall, each

"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, arXiv 1910.06378) over LoRA: FedAvg-LoRA with control variates that correct
each client's drift.

The server keeps a control variate c and every client i its own c_i (zero at the start), one per trained
tensor. Each local step moves along the corrected direction: the optimizer's step on the gradient g, then
y <- y - lr (c - c_i). After K local steps at learning rate lr from the global x to y_i, the client updates
its variate by the paper's option II

    c_i+ = c_i - c + (x - y_i) / (K lr),

the server averages the models (FedAvg, weighted by sample counts) and moves c by the sampled clients'
variate changes over all N clients: c <- c + (1/N) sum_{i in S} (c_i+ - c_i).
Interpretations:
- Server learning rate 1 (the model update is FedAvg's); a server optimizer (server.optimizer) composes.
- The variates are method state (checkpointed), kept per federation and client id: c [F, *shape],
  c_i [F, N, *shape]. In a deployment c_i lives on client i; here the server holds every client's copy.
- The correction comes after DP's clipping and noise: c and c_i derive from earlier released updates and
  the client's own past model, so they are post-processing, not new data access.
- With SGD this is the paper's y - lr (g + c - c_i). The correction is applied after the optimizer's step, as
  OpenFedLLM does, not fed into it: with AdamW, (x - y_i) / (K lr) is the client's mean step direction (in
  units of lr), so c - c_i is a difference of step directions and must not pass through Adam's
  normalisation, which would inflate it against gradients orders of magnitude smaller (the first version
  did that: SCAFFOLD sat at chance on 20 Newsgroups with AdamW).
- Upload: the paper sends (y_i - x, c_i+ - c_i), twice the model's bytes; download: x and c. The ledger
  counts both.
"""
import torch

from methods.fedavg_lora import FedAvgLoRA


class Scaffold(FedAvgLoRA):
    name = "scaffold"
    Params = None
    client_dp_unsupported = ("its clients also upload control-variate changes (x - y_i) / (K lr), an unclipped, "
                             "unnoised copy of their update")

    def __init__(self, lora, **params):
        super().__init__(lora, **params)
        self.server_c, self.client_c = {}, {}        # {name: [F, *shape]}, {name: [F, N, *shape]}

    def local_step_correction(self, name, round_idx, client_ids):
        if name not in self.server_c:                  # round 1: every variate is zero
            return None
        feds = torch.tensor([f for f, _ in client_ids])
        clients = torch.tensor([c for _, c in client_ids])
        c, c_i = self.server_c[name], self.client_c[name]
        return c[feds.to(c.device)] - c_i[feds.to(c.device), clients.to(c.device)]

    @torch.no_grad()
    def aggregate(self, global_state, client_states, weights, plan):
        new = super().aggregate(global_state, client_states, weights, plan)
        num_feds, per_fed = weights.shape
        feds, clients = (ids.to(weights.device) for ids in plan.clients_of())
        steps_lr = plan.local_steps * torch.tensor(plan.lrs, dtype=weights.dtype, device=weights.device)    # [F]
        for name, y in client_states.items():                   # y [F, m, *shape]
            x = global_state[name]
            if name not in self.server_c:
                self.server_c[name] = torch.zeros_like(x)
                self.client_c[name] = x.new_zeros(num_feds, plan.num_clients, *x.shape[1:])
            c = self.server_c[name].to(x)
            c_i = self.client_c[name].to(x)
            old = c_i[feds, clients].view_as(y)
            scale = steps_lr.view(num_feds, 1, *([1] * (y.dim() - 2)))
            fresh = old - c[:, None] + (x[:, None] - y) / scale
            c_i[feds, clients] = fresh.flatten(0, 1)
            self.client_c[name] = c_i
            self.server_c[name] = c + (fresh - old).sum(1) / plan.num_clients
        return new

    def payload_bytes(self, global_state, plan):
        up, down = super().payload_bytes(global_state, plan)
        return 2 * up, 2 * down                               # the model's tensors and their control variates

    def state_dict(self):
        return {"server_c": {k: v.cpu() for k, v in self.server_c.items()},
                "client_c": {k: v.cpu() for k, v in self.client_c.items()}}

    def load_state_dict(self, d):
        self.server_c, self.client_c = dict(d.get("server_c", {})), dict(d.get("client_c", {}))

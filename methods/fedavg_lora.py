"""FedAvg over LoRA (McMahan et al. 2017 applied to LoRA factors, as in the FFA-LoRA and SLoRA papers).

Clients train A, B and the classification head; the server averages A and B separately (not B@A),
weighted by client sample counts. A starts from peft's default (Kaiming-uniform), B from zero.
"""
import torch

from fedsim.rng import torch_generator
from fedsim.interface import Change, Method
from methods.initializers import init_head, kaiming_uniform_A


class FedAvgLoRA(Method):
    name = "fedavg_lora"
    Params = None
    train_A = True

    def init_global(self, layout, seeds):
        state = {}
        for name, (out_features, in_features) in layout.adapters.items():
            state[name + ".lora_A"] = torch.stack([kaiming_uniform_A((layout.rank, in_features),
                                                                     torch_generator(s, "lora_A", name)) for s in seeds])
            state[name + ".lora_B"] = torch.zeros(len(seeds), out_features, layout.rank)
        state.update(init_head(layout, seeds))
        return Change(state)

    def trained(self, name, round_idx):
        return self.train_A or not name.endswith(".lora_A")

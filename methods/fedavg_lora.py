"""FedAvg over LoRA (McMahan et al. 2017 applied to LoRA factors, as in the FFA-LoRA and SLoRA papers).

Clients train A, B and the classification head; the server averages A and B separately (not B@A),
weighted by client sample counts. A starts from peft's default (Kaiming-uniform), B from zero.
"""
import torch

from fedsim.rng import torch_generator
from methods.base import Method, init_head, kaiming_uniform_A


class FedAvgLoRA(Method):
    name = "fedavg_lora"
    Params = None
    train_A = True

    def init_global(self, stacked, seeds):
        state = {}
        for name, layer in stacked.lora.items():
            state[name + ".lora_A"] = torch.stack(
                [kaiming_uniform_A(layer.A.shape[1:], torch_generator(s, "lora_A", name)) for s in seeds])
            state[name + ".lora_B"] = torch.zeros(len(seeds), *layer.B.shape[1:])
        state.update(init_head(stacked, seeds, stacked.model.config.initializer_range))
        return state

    def trainable(self, name, round_idx):
        return self.train_A or not name.endswith(".lora_A")

"""Initial values the methods share: peft's LoRA A init and a fresh classification head per federation."""
import math

import torch

from fedsim.rng import torch_generator


def kaiming_uniform_A(shape, generator):
    """peft's default LoRA A init (nn.init.kaiming_uniform_ with a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def init_head(layout, seeds):
    """Fresh head per federation: weight ~ N(0, initializer_range) (transformers' BERT init), bias 0."""
    out = {}
    for name, (weight, bias) in layout.heads.items():
        out[name + ".weight"] = torch.stack([torch.randn(weight, generator=torch_generator(s, "head", name))
                                             * layout.initializer_range for s in seeds])
        out[name + ".bias"] = torch.zeros(len(seeds), *bias)
    return out

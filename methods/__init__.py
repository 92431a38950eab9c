"""Federated methods. Each is a small object (fedsim/interface.py); the registry maps config names to them."""
from fedsim.config import check_method
from fedsim.interface import LoRAParams, Method
from methods.fedavg_lora import FedAvgLoRA
from methods.ffa_lora import FFALoRA
from methods.sa_fedlora import SAFedLoRA
from methods.fedavg_fft import FedAvgFFT
from methods.fedsa_lora import FedSALoRA
from methods.slora import SLoRA
from methods.fedprox import FedProx
from methods.scaffold import Scaffold
from methods.fedex_lora import FedExLoRA
from methods.flora import FLoRA
from methods.hetlora import HetLoRA
from methods.head_only import HeadOnly
from methods.local_lora import LocalLoRA

METHODS = {m.name: m for m in (FedAvgLoRA, FedAvgFFT, SLoRA, FFALoRA, SAFedLoRA, FedSALoRA, FedProx, Scaffold,
                               FedExLoRA, FLoRA, HetLoRA, HeadOnly, LocalLoRA)}


def method_for(cfg) -> Method:
    """The method a validated run config names, built (its own parameter checks) and checked against what the
    config asks of it (fedsim.config.check_method: a server optimizer, client-level DP)."""
    method = make_method(cfg["method"], cfg["lora"])
    check_method(cfg, method)
    return method


def make_method(method_cfg: dict, lora_cfg: dict) -> Method:
    params = dict(method_cfg)
    name = params.pop("name", None)
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; valid: {sorted(METHODS)}")
    lora = LoRAParams(rank=int(lora_cfg["rank"]), alpha=float(lora_cfg["alpha"]), targets=tuple(lora_cfg["targets"])
                      if not isinstance(lora_cfg["targets"], str) else lora_cfg["targets"])
    return METHODS[name](lora, **params)

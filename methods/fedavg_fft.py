"""FedAvg with full fine-tuning (McMahan et al. 2017): the upper-bound baseline of the LoRA papers.

Every parameter of the model is trained by each client and averaged by the server, weighted by client
sample counts (the base class's aggregate). The backbone starts from the pretrained weights; the head
starts from the same seeded init as the LoRA methods so that runs differ only in what is trained.
Runs through the same engine on a FullStackedModel (every parameter stacked per replica); the LoRA
config (rank, alpha, targets) is ignored. Payload: every parameter, both ways.
"""
from fedsim.interface import Change, ContainerSpec, Method
from methods.initializers import init_head


class FedAvgFFT(Method):
    name = "fedavg_fft"
    Params = None

    def container(self):
        return ContainerSpec("full")

    def init_global(self, layout, seeds):
        F = len(seeds)                      # the pretrained backbone, and a head from each federation's seed
        state = {n: t.detach().expand(F, *t.shape).clone() for n, t in layout.tensors.items()}
        state.update(init_head(layout, seeds))
        return Change(state)

    def trained(self, name, round_idx):
        return True

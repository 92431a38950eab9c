"""Head only: the frozen pretrained backbone, only the classification head trained and federated (FedAvg).

Why it exists. Under DP-SGD with joint per-sample clipping (dp.head_share null) every sample's gradient over
all trained tensors is clipped to norm C, and the freshly initialised head's gradient is much larger than the
adapters' (while B = 0, A's is exactly 0), so the head takes most of the clip budget and of the signal left
above the noise. A private LoRA run then learns largely through its head: to show that its adapters learned
anything, it must beat this baseline, the head alone at the same epsilon, schedule and head init.

What it computes. The adapters exist as in FedAvg-LoRA (A drawn from the federation seed, B = 0), so the
layout, checkpoints and exports look like every LoRA method's, but nobody trains, clips, noises or sends
them: with B = 0 the adapter delta scale * (x A^T) B^T is exactly 0, so every client sees the pretrained
features z(x) [N, H] (the backbone's pooling) and logits = z(x) W^T + b, head W [labels, H], b [labels].
Clients run the local optimizer on (W, b); the server averages them weighted by client sample counts:
    W <- sum_i (n_i / sum_j n_j) W_i,  b likewise.
Upload = download = the head's bytes, (labels * H + labels) * 4 per client per round in fp32.
Under sample-level DP the per-sample gradient is the head's alone, dW_n = (softmax(l_n) - onehot(y_n)) z_n^T
and db_n = softmax(l_n) - onehot(y_n), so the whole clip C goes to the head; the noise sigma * C * z covers
only the head's coordinates; the accounting is any sample-level run's. Client-level DP clips the head's update.

Cost. Only the head requires a gradient and the backbone is frozen, so autograd never runs a backward through
the encoder or the adapters: a step is the forward plus the head's (per-sample) gradient [Rc, b, labels, H].
"""
from methods.fedavg_lora import FedAvgLoRA

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


class HeadOnly(FedAvgLoRA):
    name = "head_only"
    Params = None
    train_A = False

    def trained(self, name, round_idx):
        """The head (weight and bias) only; no adapter tensor, ever."""
        return not name.endswith(ADAPTER_SUFFIXES)

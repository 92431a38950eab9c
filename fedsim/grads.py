"""Where a pass's gradients land: summed per replica, or per sample in the flat layout the clip-and-noise kernel
reads. The stacked layers (fedsim/stacked.py, fedsim/full_stacked.py) put into it during backward."""
import torch

from fedsim.dp import clip_groups


class GradBuffer:
    """Receives gradients during backward, keyed by canonical tensor name.

    per_sample=False: `summed[name]` is [Rc, *shape]. per_sample=True: every trainable tensor's
    per-sample gradient goes into its slice of one flat [Rc, b, D] buffer (canonical order), the layout
    the fused clip-and-noise kernel reads, and `sq_norms` [Rc, b] accumulates the squared norms.

    With the padded forward a step may run its rows as several passes (length groups,
    fedsim.packed.length_groups), each putting every tensor's gradient once: puts add up. A sample's rows
    lie in exactly one pass and the others put exact zeros for it (its input slots are zero there), so
    summing squared norms per put is exact.
    """

    def __init__(self, specs, num_replicas, batch_size, per_sample, device, dtype=torch.float32,
                 head_names=(), head_share=None):
        self.per_sample, self.specs = per_sample, dict(specs)
        self.summed = {}
        self.received = set()       # names some layer put a gradient for (missing(): the ones none did)
        self.groups = None
        if per_sample:
            self.offsets, off = {}, 0
            for name, shape in specs:
                n = int(torch.Size(shape).numel())
                self.offsets[name] = (off, off + n)
                off += n
            self.flat = torch.zeros(num_replicas, batch_size, off, device=device, dtype=dtype)
            self.sq_norms = torch.zeros(num_replicas, batch_size, device=device, dtype=dtype)
            # per-group clipping (fedsim.dp.clip_groups): squared norms per group too, [Rc, b, G]
            self.groups = clip_groups(self.offsets, set(head_names), head_share)
            if self.groups is not None:
                self.group_sq_norms = torch.zeros(num_replicas, batch_size, len(self.groups), device=device, dtype=dtype)

    def put(self, name, grad):
        self.received.add(name)
        if not self.per_sample:
            self.summed[name] = grad if name not in self.summed else self.summed[name] + grad
            return
        lo, hi = self.offsets[name]
        self.flat[:, :, lo:hi] += grad.flatten(2)
        sq = grad.flatten(2).pow(2).sum(-1)
        self.sq_norms += sq
        if self.groups is not None:
            g = next(i for i, ((glo, ghi), _) in enumerate(self.groups) if glo <= lo < ghi)
            self.group_sq_norms[:, :, g] += sq

    def missing(self):
        """Tensors expected (specs) that no layer computed a gradient for, in canonical order."""
        return [n for n in self.specs if n not in self.received]

    def unflatten(self, flat_sum):
        """[Rc, D] (e.g. clipped + noised sums) -> {name: [Rc, *shape]}."""
        return {name: flat_sum[:, lo:hi].unflatten(-1, self.specs[name])
                for name, (lo, hi) in self.offsets.items()}

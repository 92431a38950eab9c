"""The replica containers a method can name (fedsim.interface.ContainerSpec), built in one place."""
from fedsim.full_stacked import FullStackedModel
from fedsim.stacked import StackedModel

KINDS = ("lora", "full")


def build_container(method, model, num_replicas, packed_tokens=True):
    """The container method.container() names, for num_replicas replicas of `model`: the frozen backbone with
    stacked LoRA layers (the method's rank and targets) and heads, or every weight stacked (full fine-tuning).
    packed_tokens=False: the padded forward even where the backbone has a packed one (tests compare them)."""
    spec = method.container()
    if spec.kind == "full":
        return FullStackedModel(model, num_replicas, packed_tokens=packed_tokens)
    if spec.kind == "lora":
        return StackedModel(model, num_replicas, method.lora.rank, method.lora.targets, packed_tokens=packed_tokens,
                            folded=spec.folded, train_folded=spec.train_folded)
    raise ValueError(f"method {method.name} asks for container kind {spec.kind!r}; valid: {list(KINDS)}")

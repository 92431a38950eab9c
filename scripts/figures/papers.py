"""What the three seed papers state, copied from ../shared/papers/README.md with its source tags; nothing else.

Source tags (that file's): [abstract] the paper's own abstract; [quoted] paper text quoted by third-party
extraction pages; [review] ICLR 2024 reviewers of the submitted version (its tables may differ from the
published ones); [3rd-party] a third-party reimplementation, not checked against the paper; [seed summary] the
project's summary of the paper (arXiv v1) that file cites; [untagged] a line of that file without a tag.
The papers' result tables could not be read there, so a value that file does not give is NOT_REPORTED: never
fill one in from memory.
"""
from dataclasses import dataclass, field

NOT_REPORTED = "not reported here"


@dataclass(frozen=True)
class Fact:
    value: str                  # as that file states it
    source: str                 # its source tag ("" for NOT_REPORTED)

    def __str__(self):
        return self.value if not self.source else f"{self.value} [{self.source}]"


UNKNOWN = Fact(NOT_REPORTED, "")


@dataclass(frozen=True)
class Paper:
    name: str
    arxiv: str
    setting: dict = field(default_factory=dict)     # backbone, clients, split, rounds: Fact (short)
    numbers: dict = field(default_factory=dict)     # claim id -> [Fact]: the paper's number or ordering

    @property
    def label(self):
        return f"{self.name} (arXiv {self.arxiv})"


FFA = Paper(
    "FFA-LoRA", "2403.12313",
    setting={"backbone": Fact("RoBERTa (Large per a 3rd-party config)", "quoted / 3rd-party"),
             "clients": Fact("3 (cross-silo)", "review"),
             "split": Fact("fixed label mixtures, not Dirichlet", "quoted"),
             "rounds": Fact("1000", "3rd-party")},
    numbers={
        "a": [Fact("FFA-LoRA better than LoRA on every task without DP", "seed summary"),
              Fact("table values " + NOT_REPORTED, "")],
        "b": [Fact("FFA-LoRA better than LoRA on every task with DP, ε in {6, 3, 1}, δ 1e-5",
                   "seed summary; ε: review / 3rd-party"),
              Fact("table values " + NOT_REPORTED, ""),
              Fact("in the submitted version LoRA beat FFA-LoRA \"by a significant margin\" on SST-2 at ε 1",
                   "review")],
        "c": [Fact("DP lowers both methods", "seed summary"), Fact("table values " + NOT_REPORTED, "")],
        "d": [Fact("the largest gap is on MNLI, the 3-class task with the strongest heterogeneity",
                   "seed summary"),
              Fact("submitted version: the gap stayed about the same across ε, largest at ε 1 on QQP and QNLI",
                   "review")],
        "e": [Fact("LoRA's A frozen, only B trained and sent: half the upload", "abstract")],
        "f": [Fact("FFA-LoRA does not rely on α; equivalent to LoRA with α → ∞", "abstract"),
              Fact("Theorem 1 read as \"tuning α is tuning the learning rate\"", "review")],
    })

SLORA = Paper(
    "SLoRA", "2308.06522",
    setting={"backbone": Fact("ALBERT and DistilBERT", "untagged"),
             "clients": UNKNOWN,
             "split": Fact("almost certainly Dirichlet, α values unknown", "untagged"),
             "rounds": UNKNOWN},
    numbers={
        "g": [Fact("the gap between full fine-tuning and PEFT widens as clients' data grow more diverse",
                   "abstract"), Fact("values " + NOT_REPORTED, "")],
        "h": [Fact("accuracy comparable to full fine-tuning with about 1% update density; training time cut by "
                   "up to 90%", "abstract"),
              Fact("fewer rounds to comparable accuracy", "seed summary"),
              Fact("the fraction of the gap closed " + NOT_REPORTED, "")],
        "i": [Fact("stage-1 sparse mask of about 1% density", "abstract"),
              Fact("accuracy at other densities " + NOT_REPORTED, "")],
    })

SA_FEDLORA = Paper(
    "SA-FedLoRA", "2405.09394 v1",
    setting={"backbone": Fact(NOT_REPORTED + " (its introduction points to vision models)", "untagged"),
             "clients": UNKNOWN, "split": UNKNOWN, "rounds": UNKNOWN},
    numbers={
        "j": [Fact("up to 93.62% fewer communicated parameters than FedAvg", "abstract")],
        "k": [Fact("better than FedAvg", "abstract"),
              Fact("annealing starts with a large LoRA budget (heating) and shrinks it (cooling)", "abstract"),
              Fact("fixed-rank LoRA comparison and accuracy values " + NOT_REPORTED, "")],
    })

PAPERS = {"ffa": FFA, "slora": SLORA, "sa_fedlora": SA_FEDLORA}

# The papers' numbers that a figure of ours can mark on its own axis (a fraction, a label quoting the fact):
# only those stated as numbers above; everything else is NOT_REPORTED and is not drawn.
MARKS = {
    "upload_reduction_vs_fedavg": (0.9362, "SA-FedLoRA paper: up to 93.62% fewer parameters than FedAvg "
                                           "[abstract; its schedule, not ours]"),
}


def paper_number(paper, claim_id):
    """The paper's number (or ordering) for one claim, every fact with its tag; NOT_REPORTED if none."""
    facts = paper.numbers.get(claim_id) or [UNKNOWN]
    return "; ".join(str(f) for f in facts)

"""Experts: what a fine-tune or adapter changes in its base, per kind (kinds.py), read from PEFT
folders (peft_format.py)."""

from moerge.experts.kinds import Dora, LowRank, Replace, Scaling, StackedLowRank, apply
from moerge.experts.peft_format import (
           Expert,
           ExpertAppliedSource,
           load_adapter,
           parse_adapter,
           read_adapter,
)

__all__ = ["Dora", "LowRank", "Replace", "Scaling", "StackedLowRank", "apply", "Expert", "ExpertAppliedSource", "load_adapter",
           "parse_adapter", "read_adapter"]

"""The built-in skill suite (skills.py) and the example/JSONL format (data.py)."""

from moerge.tasks.data import (
           Example,
           examples,
           mixture,
           read_jsonl,
           split_of,
           write_jsonl,
)
from moerge.tasks.skills import EXPERTS, HELDOUT, PRETRAIN, SKILLS, Skill, get

__all__ = ["Example", "examples", "mixture", "read_jsonl", "split_of", "write_jsonl",
           "EXPERTS", "HELDOUT", "PRETRAIN", "SKILLS", "Skill", "get"]

"""Collaborative descent (ColD Fusion): contributions made on a library's latest base fused into its next
base version (``fuse``), experts carried to a newer base (``rebase``), and the whole loop simulated
round by round (``simulate``), optionally on Ray."""

from moerge.fusion.fuse import FusePlan, FuseResult, fuse, plan_fuse
from moerge.fusion.rebase import RebaseResult, rebase
from moerge.fusion.simulate import simulate

__all__ = ["FusePlan", "FuseResult", "RebaseResult", "fuse", "plan_fuse", "rebase", "simulate"]

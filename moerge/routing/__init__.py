"""Routing among experts: a batched mixture runtime (mixture.py), routers (routers/, one registry),
and the routed model the evaluator and the CLI use (model.py)."""

from moerge.routing.model import RoutedModel, load_routed
from moerge.routing.registry import Router, names, register

__all__ = ["RoutedModel", "Router", "load_routed", "names", "register"]

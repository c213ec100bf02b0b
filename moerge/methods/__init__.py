"""Merge methods: pure tensor functions registered by name (see registry.py)."""

from moerge.methods.registry import Method, Param, get, names, register

__all__ = ["Method", "Param", "get", "names", "register"]

"""moerge's version, on the bottom floor: cards written by the engine record it without importing the API."""

__version__ = "0.1.0"

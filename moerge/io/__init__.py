"""Storage: lazy tensor sources and the sharded atomic writer."""

from moerge.io.source import open_source
from moerge.io.writer import ShardedWriter

__all__ = ["open_source", "ShardedWriter"]

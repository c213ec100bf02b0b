"""Storage: lazy tensor sources, the sharded atomic writer, the content-addressed object store.

Imported lazily (PEP 562): ``moerge.io.blobs`` is used by git's filters, which must start without
loading torch."""

__all__ = ["open_source", "ShardedWriter"]


def __getattr__(name: str):
    if name == "open_source":
        from moerge.io.source import open_source

        return open_source
    if name == "ShardedWriter":
        from moerge.io.writer import ShardedWriter

        return ShardedWriter
    raise AttributeError(name)

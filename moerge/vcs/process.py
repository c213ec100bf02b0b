"""git's long-running filter protocol (``filter.moerge.process``): one process cleans and smudges every
file of a command, instead of one process per file, so a commit of a sharded checkpoint or of many
adapters pays Python's start-up once. The work per file is ``filter.clean`` and ``filter.smudge``.

The protocol (gitattributes(5), "Long Running Filter Process"): pkt-lines of at most 65516 bytes of
data, each prefixed by its length in 4 hex digits, "0000" ending a list. After a handshake (version
2, capabilities clean and smudge), git sends per file ``command=...``, ``pathname=...`` and the content;
the filter answers ``status=success`` and the new content, or ``status=error`` (git then fails that
file, since the filter is required), and keeps serving.

    python -m moerge.vcs.process      (git: filter.moerge.process)
"""

from __future__ import annotations

import sys
from typing import BinaryIO

from moerge.vcs.filter import clean, smudge
from moerge.vcs.repo import objects

MAX_DATA = 65516


class ProtocolError(Exception):
    pass


def read_pkt(f: BinaryIO) -> bytes | None:
    """One packet's data; None for a flush packet; EOFError when git closed the pipe."""
    head = f.read(4)
    if not head:
        raise EOFError
    if len(head) < 4:
        raise ProtocolError("truncated pkt-line header")
    n = int(head, 16)
    if n == 0:
        return None
    if n < 4:
        raise ProtocolError(f"bad pkt-line length {n}")
    data = f.read(n - 4)
    if len(data) < n - 4:
        raise ProtocolError("truncated pkt-line")
    return data


def write_pkt(f: BinaryIO, data: bytes) -> None:
    f.write(b"%04x" % (len(data) + 4) + data)


def flush(f: BinaryIO) -> None:
    f.write(b"0000")


def read_list(f: BinaryIO) -> list[str]:
    """Text packets up to a flush: "key=value" lines."""
    out = []
    while True:
        p = read_pkt(f)
        if p is None:
            return out
        out.append(p.decode().rstrip("\n"))


class PktReader:
    """The content git sends (packets up to a flush) as a readable stream, for ``filter.clean``."""

    def __init__(self, f: BinaryIO):
        self.f, self.buf, self.done = f, bytearray(), False

    def _fill(self, n: int) -> None:
        while len(self.buf) < n and not self.done:
            p = read_pkt(self.f)
            if p is None:
                self.done = True
            else:
                self.buf += p

    def peek(self, n: int = 1) -> bytes:
        self._fill(n)
        return bytes(self.buf[:n])

    def read(self, n: int = -1) -> bytes:
        self._fill(float("inf") if n is None or n < 0 else n)  # type: ignore[arg-type]
        if n is None or n < 0:
            n = len(self.buf)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def drain(self) -> None:
        while not self.done:
            self._fill(len(self.buf) + MAX_DATA)
            self.buf.clear()


class PktWriter:
    """What the filter writes, sent as packets of at most MAX_DATA bytes."""

    def __init__(self, f: BinaryIO):
        self.f = f

    def write(self, data: bytes) -> int:
        view, f = memoryview(data), self.f
        for i in range(0, len(view), MAX_DATA):  # no copies: the length, then a slice of the caller's buffer
            chunk = view[i:i + MAX_DATA]
            f.write(b"%04x" % (len(chunk) + 4))
            f.write(chunk)
        return len(data)


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    import io

    if read_list(inp) != ["git-filter-client", "version=2"]:
        raise ProtocolError("not git's filter protocol (version 2)")
    write_pkt(out, b"git-filter-server\n")
    write_pkt(out, b"version=2\n")
    flush(out)
    caps = read_list(inp)
    for cap in ("capability=clean", "capability=smudge"):
        if cap in caps:
            write_pkt(out, cap.encode() + b"\n")
    flush(out)
    out.flush()
    store = None
    while True:
        try:
            header = dict(line.split("=", 1) for line in read_list(inp))
        except EOFError:
            return
        command, path = header.get("command"), header.get("pathname", "<unknown>")
        reader = PktReader(inp)
        if command not in ("clean", "smudge"):
            reader.drain()
            _error(out, f"{path}: git asked for {command!r}; this filter cleans and smudges")
            continue
        store = store or objects()
        if command == "clean":  # the manifest is small: known complete before the status is sent
            result = io.BytesIO()
            try:
                clean(reader, result, store, path)
                reader.drain()
            except Exception as e:  # one file's failure: report it, keep serving the others
                reader.drain()
                _error(out, str(e))
                continue
            write_pkt(out, b"status=success\n")
            flush(out)
            PktWriter(out).write(result.getvalue())
            flush(out)
            flush(out)  # an empty list: the status stays "success"
            out.flush()
            continue
        # smudge streams the checkpoint out as it is read (a file can be many GB); a failure part way
        # ends the content and then says status=error, as the protocol allows
        manifest = reader.read()
        write_pkt(out, b"status=success\n")
        flush(out)
        try:
            smudge(io.BytesIO(manifest), PktWriter(out), store, path)
        except Exception as e:
            flush(out)
            print(f"moerge: error: {e}", file=sys.stderr, flush=True)
            write_pkt(out, b"status=error\n")
            flush(out)
            out.flush()
            continue
        flush(out)
        flush(out)
        out.flush()


def _error(out: BinaryIO, message: str) -> None:
    print(f"moerge: error: {message}", file=sys.stderr, flush=True)
    write_pkt(out, b"status=error\n")
    flush(out)
    out.flush()


def main() -> int:
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except (ProtocolError, EOFError) as e:
        print(f"moerge: error: filter protocol: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

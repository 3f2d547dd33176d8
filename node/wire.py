"""Framing for the swarm's libp2p streams, with a timeout on every wait and a size limit on every read.

A stream carries *frames*::

    u32 header_len | u64 payload_len | header (msgpack map, <= 64 KiB) | payload (raw bytes, <= caller's limit)

Bulk bytes (weight chunks, signed rollout groups, signed manifests) travel as the raw payload and are never
re-encoded. Headers are small maps of plain types. Payloads are written in 256 KiB pieces, each piece first
admitted by the node's :class:`~node.ratelimit.TokenBucket` (upload cap) and each ``drain`` bounded by a stall
timeout, so a slow or silent peer costs a bounded wait and never blocks other streams.

Protocol (handler) names are namespaced by run id: ``gepo-swarm/<run_id>/<service>/1``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

import msgpack

from .ratelimit import TokenBucket

logger = logging.getLogger(__name__)

_PREFIX = struct.Struct(">IQ")
MAX_HEADER_BYTES = 64 * 1024
PIECE_BYTES = 256 * 1024
READ_PIECE_BYTES = 1 << 20
STREAM_READER_LIMIT = 1 << 22


class WireError(Exception):
    """The stream broke, timed out, or carried a malformed/oversized frame. ``eof``: closed cleanly between frames."""

    def __init__(self, message: str, eof: bool = False):
        super().__init__(message)
        self.eof = eof


class RemoteError(Exception):
    """The remote peer answered with an error frame (``{"ok": False, "err": code, ...}``)."""

    def __init__(self, code: str, message: str = "", header: Optional[Dict[str, Any]] = None):
        self.code = code
        self.message = message
        self.header = header or {}
        super().__init__(f"{code}: {message}" if message else code)


def proto_name(run_id: str, service: str) -> str:
    return f"gepo-swarm/{run_id}/{service}/1"


def _pack(header: Dict[str, Any]) -> bytes:
    data = msgpack.packb(header, use_bin_type=True)
    if len(data) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    return data


def encode_frame(header: Dict[str, Any], payload: bytes = b"") -> bytes:
    """A whole (small) frame as bytes, for writing without awaiting (pipelined requests)."""
    head = _pack(header)
    return _PREFIX.pack(len(head), len(payload)) + head + bytes(payload)


async def send_frame(
    writer: asyncio.StreamWriter,
    header: Dict[str, Any],
    payload=None,
    *,
    timeout: float,
    limiter: Optional[TokenBucket] = None,
    counter: Optional[Callable[[int], None]] = None,
) -> None:
    """Write one frame. ``timeout`` bounds every single drain (a stall), not the whole transfer."""
    head = _pack(header)
    view = memoryview(payload).cast("B") if payload is not None else memoryview(b"")
    total = len(view)
    first = _PREFIX.pack(len(head), total) + head
    if limiter is not None:
        await limiter.acquire(len(first))
    writer.write(first)
    if counter is not None:
        counter(len(first))
    step = PIECE_BYTES if limiter is not None and limiter.rate is not None else max(total, 1)
    try:
        for off in range(0, total, step):
            piece = view[off : off + step]
            if limiter is not None:
                await limiter.acquire(len(piece))
            writer.write(piece)
            if counter is not None:
                counter(len(piece))
            await asyncio.wait_for(writer.drain(), timeout)
        await asyncio.wait_for(writer.drain(), timeout)
    except asyncio.TimeoutError:
        raise WireError(f"peer did not read for {timeout:.1f} s") from None
    except (ConnectionError, BrokenPipeError, RuntimeError) as e:
        raise WireError(f"stream closed while writing: {e!r}") from None


async def _read_exactly(reader: asyncio.StreamReader, n: int, timeout: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.readexactly(n), timeout)
    except asyncio.TimeoutError:
        raise WireError(f"peer sent nothing for {timeout:.1f} s") from None
    except asyncio.IncompleteReadError as e:
        raise WireError(f"stream closed after {len(e.partial)} of {n} bytes", eof=not e.partial) from None
    except (ConnectionError, RuntimeError) as e:
        raise WireError(f"stream error while reading: {e!r}") from None


async def recv_header(
    reader: asyncio.StreamReader, *, timeout: float, max_payload: int
) -> Tuple[Dict[str, Any], int]:
    """Read a frame's prefix and header; returns ``(header, payload_len)``. The payload is still unread."""
    prefix = await _read_exactly(reader, _PREFIX.size, timeout)  # WireError(eof=True): no further frame
    hlen, plen = _PREFIX.unpack(prefix)
    if hlen > MAX_HEADER_BYTES:
        raise WireError(f"frame header of {hlen} bytes exceeds {MAX_HEADER_BYTES}")
    if plen > max_payload:
        raise WireError(f"frame payload of {plen} bytes exceeds limit {max_payload}")
    raw = await _read_exactly(reader, hlen, timeout)
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False, max_bin_len=hlen, max_str_len=hlen)
    except Exception as e:
        raise WireError(f"malformed frame header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("frame header is not a map")
    return header, plen


async def recv_payload(reader: asyncio.StreamReader, n: int, *, timeout: float) -> bytes:
    if n == 0:
        return b""
    if n <= READ_PIECE_BYTES:
        return await _read_exactly(reader, n, timeout)
    parts = []
    got = 0
    while got < n:
        part = await _read_exactly(reader, min(READ_PIECE_BYTES, n - got), timeout)
        parts.append(part)
        got += len(part)
    return b"".join(parts)


async def recv_payload_into(reader: asyncio.StreamReader, dst, *, timeout: float, size: Optional[int] = None) -> None:
    """Read exactly ``len(dst)`` bytes into ``dst`` (a slice of a preallocated buffer), or - if ``dst`` is a
    callable ``write(offset, data)`` - exactly ``size`` bytes handed to it piece by piece.

    Copies straight from the StreamReader's buffer (one copy less than ``readexactly``); falls back to
    ``readexactly`` pieces on Python < 3.11 or if the reader does not look like CPython's StreamReader.
    (The emptiness check and the wait must happen in the same task without yielding in between - hence
    ``asyncio.timeout`` rather than ``wait_for``, which would run the wait in a new task and miss data that
    arrives before that task starts.)"""
    if callable(dst):
        write, n = dst, int(size)
    else:
        view_dst = dst

        def write(off: int, data: memoryview) -> None:
            view_dst[off : off + len(data)] = data

        n = len(dst)
    got = 0
    buf = getattr(reader, "_buffer", None)
    wait = getattr(reader, "_wait_for_data", None)
    resume = getattr(reader, "_maybe_resume_transport", None)
    if not hasattr(asyncio, "timeout") or not isinstance(buf, bytearray) or wait is None or resume is None:
        while got < n:
            part = await _read_exactly(reader, min(READ_PIECE_BYTES, n - got), timeout)
            write(got, memoryview(part))
            got += len(part)
        return
    while got < n:
        if not buf:
            if reader.at_eof():
                raise WireError(f"stream closed after {got} of {n} bytes")
            try:
                async with asyncio.timeout(timeout):
                    await wait("recv_payload_into")
            except (asyncio.TimeoutError, TimeoutError):
                raise WireError(f"peer sent nothing for {timeout:.1f} s") from None
            except (ConnectionError, RuntimeError) as e:
                raise WireError(f"stream error while reading: {e!r}") from None
            if getattr(reader, "_exception", None) is not None:
                raise WireError(f"stream error while reading: {reader._exception!r}")  # noqa: SLF001
            continue
        k = min(len(buf), n - got)
        with memoryview(buf) as view:
            with view[:k] as piece:
                write(got, piece)
        del buf[:k]
        got += k
        resume()


async def recv_frame(
    reader: asyncio.StreamReader, *, timeout: float, max_payload: int
) -> Tuple[Dict[str, Any], bytes]:
    header, plen = await recv_header(reader, timeout=timeout, max_payload=max_payload)
    payload = await recv_payload(reader, plen, timeout=timeout)
    return header, payload


def raise_for_error(header: Dict[str, Any]) -> Dict[str, Any]:
    if header.get("ok", False) is not True:
        raise RemoteError(str(header.get("err", "error")), str(header.get("msg", ""))[:500], header)
    return header


def error_header(code: str, message: str = "", **extra: Any) -> Dict[str, Any]:
    return {"ok": False, "err": code, "msg": message[:500], **extra}


async def open_stream(p2p, peer_id, proto: str, *, timeout: float):
    """Open a stream to ``peer_id``'s handler ``proto``; returns ``(reader, writer)``."""
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer_id, proto), timeout)
    except asyncio.TimeoutError:
        raise WireError(f"could not open a stream to {peer_id} within {timeout:.1f} s") from None
    except Exception as e:  # P2PDaemonError / ControlFailure / ConnectionError
        raise WireError(f"could not open a stream to {peer_id}: {e}") from None
    _tune_reader(reader)
    return reader, writer


def _tune_reader(reader: asyncio.StreamReader) -> None:
    # asyncio pauses the socket whenever 2 x limit bytes are buffered; the default 64 KiB limit makes a 1 MiB
    # read pause and resume the transport ~8 times. A larger limit only affects readline() otherwise.
    try:
        reader._limit = max(getattr(reader, "_limit", 0), STREAM_READER_LIMIT)  # noqa: SLF001
    except Exception:  # pragma: no cover
        pass


async def close_writer(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except Exception:  # pragma: no cover
        pass


StreamHandler = Callable[[Any, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def linger(reader: asyncio.StreamReader, timeout: float) -> None:
    """Wait (bounded) until the peer closes its side. Closing first can make the libp2p daemon drop the last bytes
    still in flight to the peer, so the side that answered lets the side that asked close first."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            data = await asyncio.wait_for(reader.read(65536), left)
            if not data:
                return
    except (asyncio.TimeoutError, ConnectionError, RuntimeError):
        return


LINGER_SECONDS = 10.0


def guarded_handler(name: str, handler: StreamHandler, on_error: Optional[Callable[[Exception], None]] = None):
    """Wrap a stream handler: tune the reader, log (not raise) errors, let the peer close first (bounded), and
    always close the stream."""

    async def _handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _tune_reader(reader)
        try:
            await handler(stream_info.peer_id, reader, writer)
            await linger(reader, LINGER_SECONDS)
        except (WireError, RemoteError) as e:
            logger.debug("%s: stream from %s failed: %s", name, stream_info.peer_id, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning("%s: handler error for %s: %r", name, stream_info.peer_id, e, exc_info=True)
            if on_error is not None:
                on_error(e)
        finally:
            await close_writer(writer)

    return _handle

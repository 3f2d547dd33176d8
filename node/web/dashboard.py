"""`python -m node.monitor --web HOST:PORT`: the monitor's snapshots as a web page with live plots.

The monitor thread calls :meth:`Dashboard.update` with every snapshot; the HTTP server (stdlib, its own threads)
serves three things and nothing else:

    GET /                 the page (static/index.html), which polls /api/state and redraws
    GET /static/<name>    the page's files (its JS and CSS, and the vendored uPlot chart library)
    GET /api/state        {"snapshot": the newest snapshot, "history": {"t": [...], <series>: [...]}, "interval"}

History is a ring of the last ``history`` snapshots (one point each), kept as columns so the page hands them to
uPlot as they are. The server is bounded: at most ``max_connections`` requests are handled at once (others are
closed unanswered), each connection times out after ``request_timeout`` seconds, and the JSON is encoded once per
snapshot, not once per request.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import socket
import threading
from collections import deque
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

log = logging.getLogger("node.web")

STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png"}

#: the series the page plots, one value per snapshot (None where unknown: uPlot draws a gap)
SERIES = ("version", "steps_per_s", "reward_mean", "eval_accuracy", "staleness_mean", "max_lag",
          "rejected", "stale", "sampler_rejected", "samplers")


class WebAddressError(ValueError):
    """A --web value that is not HOST:PORT, or where nothing can listen."""


def parse_address(text: str) -> Tuple[str, int]:
    """'127.0.0.1:8080', 'localhost:8080' or '[::1]:8080' -> (host, port). Port 0 picks a free port."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise WebAddressError(f"--web {text!r}: {host!r} is not an IPv6 address") from None
    if (not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535
            or (not bracketed and any(ch in host for ch in ":[]"))):
        raise WebAddressError(f"--web {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 (an IPv6 host in "
                              f"brackets: [::1]:8080)")
    return host, int(port)


def history_point(snap: Dict[str, Any]) -> Dict[str, Any]:
    """The plotted numbers of one snapshot (see SERIES)."""
    ln = snap.get("learner") or {}
    samplers = snap.get("samplers") or []
    lags = [s["lag"] for s in samplers if s.get("lag") is not None]
    return {
        "t": snap["time"], "version": ln.get("version"), "steps_per_s": ln.get("steps_per_s"),
        "reward_mean": ln.get("reward_mean"), "eval_accuracy": ln.get("eval_accuracy"),
        "staleness_mean": ln.get("staleness_mean"), "max_lag": max(lags) if lags else None,
        "rejected": ln.get("rejected"), "stale": ln.get("stale"),
        "sampler_rejected": sum(s.get("rejected", 0) for s in samplers) if samplers else None,
        "samplers": len(samplers),
    }


class Dashboard:
    """The latest snapshot and a bounded history, encoded as the /api/state body."""

    def __init__(self, history: int = 720, interval: float = 5.0) -> None:
        self.interval = interval
        self._points: deque = deque(maxlen=max(1, history))
        self._lock = threading.Lock()
        self._body = self._encode(None)

    def update(self, snap: Dict[str, Any]) -> None:
        with self._lock:
            self._points.append(history_point(snap))
            self._body = self._encode(snap)

    def _encode(self, snap: Optional[Dict[str, Any]]) -> bytes:
        points = list(self._points)
        history = {name: [p[name] for p in points] for name in ("t", *SERIES)}
        return json.dumps({"snapshot": snap, "history": history, "interval": self.interval}).encode()

    def body(self) -> bytes:
        with self._lock:
            return self._body


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "DashboardServer"
    timeout = 10.0  # per connection (set from the server below)
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        path = self.path.split("?", 1)[0]
        if path == "/api/state":
            return self._send(200, "application/json", self.server.dashboard.body())
        if path in ("/", "/index.html"):
            path = "/static/index.html"
        name = path[len("/static/"):] if path.startswith("/static/") else ""
        if name in self.server.static_files:
            return self._send(200, _TYPES.get(Path(name).suffix, "application/octet-stream"),
                              self.server.static_files[name])
        self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # small files; a new version of the package shows at once
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")  # nothing else loads
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.address_string(), format % args)


class DashboardServer(http.server.ThreadingHTTPServer):
    """Serves a :class:`Dashboard` on (host, port) from a background thread; at most `max_connections` at once."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], dashboard: Dashboard, max_connections: int = 16,
                 request_timeout: float = 10.0) -> None:
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise WebAddressError(f"--web {host}:{port}: unknown host ({exc.strerror})") from None
        self.address_family = infos[0][0]
        self.dashboard = dashboard
        self.static_files = {p.name: p.read_bytes() for p in STATIC.iterdir() if p.is_file()}  # ~70 KB, read once
        self._slots = threading.BoundedSemaphore(max_connections)
        handler = type("Handler", (_Handler,), {"timeout": request_timeout})
        try:
            super().__init__(infos[0][4][:2], handler)
        except OSError as exc:
            raise WebAddressError(f"--web {host}:{port}: cannot listen there ({exc.strerror or exc})") from None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: close rather than queue without bound
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def start(self) -> "DashboardServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="dashboard-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()

"""`python -m node.monitor --web HOST:PORT`: the web dashboard.

The server is checked over real HTTP on 127.0.0.1 (what it serves, the history ring, its connection bound, bad
addresses); the end-to-end test runs a real learner and two samplers (the tiny policy) on loopback, the monitor with
--web as a subprocess, and a real headless Chromium (Debian's `chromium`, driven over the DevTools pipe:
tests/browser.py) that loads the page, reads the table and plots from the DOM while they update, and takes a
screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request

import pytest

from node.local import LOOPBACK, Proc, join_args, stop_all
from node.monitor import RateTracker, snapshot
from node.web.dashboard import Dashboard, DashboardServer, WebAddressError, parse_address
from protocol.identity import Identity
from protocol.records import LearnerHeartbeat, decode_record, encode_record, milli_counters
from tests.browser import Chromium, chromium_binary
from tests.test_monitor import DEAD, monitor

pytestmark = pytest.mark.timeout(300)

PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def get(url: str, timeout: float = 10) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def heartbeat(t: float, step: int, counters: dict) -> LearnerHeartbeat:
    return LearnerHeartbeat(run_id="r", peer_id=PEER, policy_version=step, manifest_digest=b"\x01" * 32,
                            manifest_size=10, weights_size=2**20, time=t, counters={"step": step, **counters})


def test_milli_counters_travel_in_the_heartbeat_and_reach_the_snapshot():
    extra = milli_counters(reward_mean=0.4567, staleness_mean=2.0, eval_accuracy=None)
    assert extra == {"reward_mean_milli": 457, "staleness_mean_milli": 2000}
    # Nothing a reader would refuse: negative or non-finite values are left out, not sent.
    assert milli_counters(a=-0.5, b=float("nan"), c=float("inf")) == {}
    hb = decode_record(encode_record(heartbeat(1000.0, 5, extra)))
    snap = snapshot("r", {Identity.generate().public_key: hb}, {}, 1001.0, RateTracker())
    assert snap["learner"]["reward_mean"] == pytest.approx(0.457) and snap["learner"]["staleness_mean"] == 2.0
    assert snap["learner"]["eval_accuracy"] is None
    # A learner that sends none of them (an older one) still shows, with the numbers unknown.
    old = snapshot("r", {Identity.generate().public_key: heartbeat(1000.0, 5, {})}, {}, 1001.0, RateTracker())
    assert old["learner"]["reward_mean"] is None and old["learner"]["version"] == 5


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)), ("localhost:0", ("localhost", 0)), ("[::1]:9000", ("::1", 9000)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["8080", ":8080", "127.0.0.1", "127.0.0.1:", "127.0.0.1:http", "1.2.3.4:70000",
                                  "[::1:8080", "[nonsense]:80", "::1:8080"])
def test_parse_address_refuses_what_is_not_host_port(text):
    with pytest.raises(WebAddressError, match="--web"):
        parse_address(text)


def test_server_serves_the_page_the_state_and_nothing_else():
    dashboard = Dashboard(history=3, interval=2.0)
    server = DashboardServer(("127.0.0.1", 0), dashboard).start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        code, ctype, body = get(server.url + "api/state")
        assert code == 200 and ctype == "application/json"
        state = json.loads(body)
        assert state["snapshot"] is None and state["history"]["t"] == [] and state["interval"] == 2.0

        tracker = RateTracker()
        key = Identity.generate().public_key
        for i in range(5):
            dashboard.update(snapshot("r", {key: heartbeat(1000.0 + 10 * i, i, milli_counters(reward_mean=i / 10))},
                                      {}, 1001.0 + 10 * i, tracker))
        state = json.loads(get(server.url + "api/state")[2])
        assert state["snapshot"]["learner"]["version"] == 4
        history = state["history"]
        assert history["t"] == [1021.0, 1031.0, 1041.0]  # the ring keeps the last 3 snapshots
        assert history["version"] == [2, 3, 4] and history["reward_mean"] == [0.2, 0.3, 0.4]
        assert history["eval_accuracy"] == [None] * 3 and history["samplers"] == [0] * 3

        code, ctype, page = get(server.url)
        assert code == 200 and ctype.startswith("text/html") and b"/static/dashboard.js" in page
        for name, kind in (("uPlot.iife.min.js", "text/javascript"), ("uPlot.min.css", "text/css"),
                           ("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            code, ctype, body = get(server.url + "static/" + name)
            assert code == 200 and ctype.startswith(kind) and len(body) > 500, name
        for path in ("static/../dashboard.py", "static/%2e%2e/dashboard.py", "static/", "etc/passwd", "api"):
            assert get(server.url + path)[0] == 404, path
        request = urllib.request.Request(server.url + "api/state", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 501
    finally:
        server.close()


def test_server_refuses_an_address_it_cannot_listen_on():
    first = DashboardServer(("127.0.0.1", 0), Dashboard())
    try:
        with pytest.raises(WebAddressError, match="cannot listen there"):
            DashboardServer(("127.0.0.1", first.server_address[1]), Dashboard())
    finally:
        first.close()


def test_server_bounds_its_connections():
    server = DashboardServer(("127.0.0.1", 0), Dashboard(), max_connections=2, request_timeout=1.0).start()
    idle = []
    try:
        port = server.server_address[1]
        for _ in range(2):  # two clients that connect and say nothing hold both slots...
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.3)
        third = socket.create_connection(("127.0.0.1", port), timeout=10)
        third.sendall(b"GET /api/state HTTP/1.0\r\n\r\n")
        assert third.recv(100) == b""  # ...so a third is closed unanswered
        third.close()
        for s in idle:  # and they are dropped after request_timeout, freeing the slots
            s.settimeout(10)
            assert s.recv(100) == b""
        assert get(server.url + "api/state")[0] == 200
    finally:
        for s in idle:
            s.close()
        server.close()


def test_bad_web_address_gives_a_one_line_error():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cases = [("nonsense", "expected HOST:PORT"),
                 (f"127.0.0.1:{taken.getsockname()[1]}", "cannot listen there")]
        for web, message in cases:
            started = time.monotonic()
            out = monitor("--peers", DEAD, "--web", web, *LOOPBACK, timeout=90)
            assert out.returncode == 2, out.stderr[-2000:]
            errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and message in errors[0] and "--web" in errors[0], out.stderr[-2000:]
            assert "Traceback" not in out.stderr and out.stdout == ""
            assert time.monotonic() - started < 60  # before any swarm start-up (seconds on a quiet machine)
    finally:
        taken.close()


# -------------------------------------------------------------------------------------------------------------
# the page in a real browser against a live swarm

PAGE = """(() => {
  const text = (sel) => [...document.querySelectorAll(sel)].map((e) => e.textContent);
  const tiles = {};
  for (const t of document.querySelectorAll('#learner-tiles .tile'))
    tiles[t.querySelector('.label').textContent] = t.querySelector('.value').textContent;
  return {
    updates: Number(document.body.dataset.updates), run: document.getElementById('run-id').textContent,
    status: document.getElementById('status').textContent, tiles,
    samplers: [...document.querySelectorAll('#sampler-rows tr[data-key]')].map((r) => ({
      key: r.dataset.key, cells: [...r.cells].map((c) => c.textContent)})),
    plots: Object.fromEntries([...document.querySelectorAll('figure.plot')].map((f) => [f.id, {
      first: Number(f.dataset.firstPoints), points: Number(f.dataset.points), last: f.dataset.last,
      canvas: (f.querySelector('canvas') || {}).width || 0,
      legend: text('#' + f.id + ' .u-legend .u-label')}])),
  };
})()"""


def _chromium_or_skip() -> str:
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs the Debian package before the tests")
        pytest.skip("needs the chromium binary (Debian: apt-get install chromium); CI installs it")
    return binary


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dashboard_in_a_browser_shows_a_live_swarm(tmp_path):
    binary = _chromium_or_skip()
    procs: list[Proc] = []
    try:
        learner = Proc(["-m", "node.learner", "--run-dir", str(tmp_path / "learner"), "--run-id", "dash",
                        "--group-size", "4", "--groups-per-step", "2", "--max-steps", "1000", "--eval-every", "2",
                        "--eval-size", "8", "--reward-workers", "1", "--no-tensorboard", "--torch-threads", "1",
                        # no group may be rejected as stale however the queues grow: rejected == 0 is asserted below
                        "--max-staleness", "100000", *LOOPBACK], tmp_path / "learner.log")
        procs.append(learner)
        join = join_args(learner, timeout=180)
        peers = join[join.index("--peers") + 1]
        for i in range(2):
            procs.append(Proc(["-m", "node.sampler", *join, "--state-dir", str(tmp_path / f"s{i}"),
                               "--batch-prompts", "2", "--torch-threads", "1", *LOOPBACK], tmp_path / f"s{i}.log"))
        mon = Proc(["-m", "node.monitor", "--peers", peers, "--run-id", "dash", "--web", "127.0.0.1:0",
                    "--interval", "1", "--window", "20", *LOOPBACK], tmp_path / "monitor.log")
        procs.append(mon)
        url = mon.wait_for(r"dashboard: (http://127\.0\.0\.1:\d+/)", timeout=60).group(1)

        with Chromium(binary, width=1280, height=900) as page:
            page.open(url)
            # The page fills in once the learner trains and both samplers have sent groups.
            first = page.wait_for(f"(s => s.samplers.length === 2 && s.samplers.every(r => Number(r.cells[6]) >= 1)"
                                  f" && Number(s.tiles.step) >= 1 && s)({PAGE})", timeout=150)
            # ...and keeps updating while it stays open: the plots grow by several points.
            later = page.wait_for(
                f"(s => s.plots['plot-reward'].points >= {first['plots']['plot-reward']['points']} + 3"
                f" && s.updates >= {first['updates']} + 3 && s)({PAGE})", timeout=60)
            api = json.loads(get(url + "api/state")[2])
            shot = tmp_path / "dashboard.png"
            page.screenshot(str(shot))
            after = page.evaluate(PAGE)
            assert page.errors() == []  # no exception, failed load or blocked resource

        assert later["run"] == "dash" and later["status"] == "live"
        assert {s["key"] for s in later["samplers"]} == {s["key"] for s in api["snapshot"]["samplers"]}
        for row in later["samplers"]:
            version, lag = int(row["cells"][2]), int(row["cells"][3])
            assert 0 <= version <= int(later["tiles"]["version"]) and lag >= 0
            assert int(row["cells"][6]) >= 1  # groups sent
        assert int(later["tiles"]["version"]) >= int(first["tiles"]["version"]) >= 1
        assert later["tiles"]["rejected"] == "0" and later["tiles"]["held-out acc."] != "-"
        assert later["tiles"]["reward"] != "-" and later["tiles"]["staleness"] != "-"
        for plot_id, plot in later["plots"].items():
            assert plot["canvas"] > 200, plot_id  # uPlot drew into a canvas of the card's width
            assert plot["points"] >= plot["first"], plot_id
        assert later["plots"]["plot-accuracy"]["points"] >= 3  # the held-out accuracy from the start (step 0)
        assert 0.0 <= float(later["plots"]["plot-accuracy"]["last"]) <= 1.0
        assert later["plots"]["plot-rejects"]["legend"] == ["Time", "rejected", "dropped stale",
                                                         "sampler-reported"]
        assert after["samplers"] and after["plots"]["plot-reward"]["points"] >= later["plots"]["plot-reward"]["points"]

        # The screenshot is the page as laid out (full height), not a blank or error page.
        from PIL import Image

        with Image.open(shot) as image:
            assert image.width == 1280 and image.height >= 900
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50
        if os.environ.get("GEPO_DASHBOARD_SCREENSHOT"):  # docs/MONITOR.md's picture comes from here
            shutil.copy(shot, os.environ["GEPO_DASHBOARD_SCREENSHOT"])
    finally:
        stop_all(procs)

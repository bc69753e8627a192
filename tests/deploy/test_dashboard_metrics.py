"""Every metric the Grafana dashboard and the alert rules query exists on a running cluster.

Starts `remem up`, drives a little NBD I/O through it (nbdsh: write, read, flush, trim,
zero), then a real Prometheus (Debian's `prometheus`) on loopback that scrapes every process
listed in the file_sd file `remem up` writes (STATE_DIR/prometheus-targets.json, jobs
remem-placement/-pageserver/-mirror/-client) and loads charts/remem/files/alerts.yaml. Once
every target was scraped three times and every rule group evaluated after that, it asks
Prometheus for each vector selector of each dashboard query, template variable and alert
expression (tests/deploy/promql.py finds them), and runs each dashboard query, which must
parse and return data. A healthy cluster raises no alert: no rule errors, none is pending or
firing, and each alert expression evaluates to nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from remem_common.testing import ServiceProcess, start_service

from .promql import Selector, selectors, substitute

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "charts/remem/files/alerts.yaml"
DASHBOARD = ROOT / "charts/remem/files/dashboard.json"
JOBS = ("remem-placement", "remem-pageserver", "remem-mirror", "remem-client")
# What Grafana puts in for its variables when the test runs a dashboard query itself.
GRAFANA_VALUES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "client": ".*"}
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*\w+\s*\)\s*$")
SCRAPE_INTERVAL = "1s"
TIMEOUT = 120.0

# nbdsh (libnbd's Python shell) moves pages through the cluster, so the latency histograms
# and the page servers' usage have data; every request must succeed.
NBD_IO = """
import os
data = os.urandom(1 << 20)
h.pwrite(data, 0)
h.pwrite(data, 8 << 20)
assert h.pread(1 << 20, 0) == data
assert h.pread(4096, 8 << 20) == data[:4096]
h.flush()
h.trim(1 << 20, 8 << 20)
h.zero(1 << 20, 16 << 20)
assert h.pread(4096, 16 << 20) == bytes(4096)
print("io ok")
"""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not installed (Debian packages prometheus, python3-libnbd: make deps)")
    return path


# -- what the dashboard and the alerts query ------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[str]:
    """Each dashboard target's PromQL with Grafana's variables filled in."""
    board = dashboard()
    return [
        substitute(target["expr"], GRAFANA_VALUES)
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


def variable_selectors() -> list[Selector]:
    """The selectors of the dashboard's query variables (`label_values(SELECTOR, label)`)."""
    found: list[Selector] = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.match(text)
        assert match, f"variable {variable['name']}: expected label_values(...), got {text!r}"
        found += selectors(match.group("selector"))
    return found


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {
        rule["alert"]: rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def queried_selectors() -> list[Selector]:
    """Every distinct selector the dashboard (targets, variables) and the alerts use."""
    found = variable_selectors()
    for expr in [*dashboard_queries(), *alert_exprs().values()]:
        found += selectors(expr)
    return sorted(set(found), key=lambda s: (s.name, s.matchers))


def test_selectors_are_found_in_promql_syntax() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{cmd="read",x=~"$v"}'
        "[$__rate_interval] offset 1h))) / on (instance) group_left (zone) b"
        ' + sum(c{s="x{y}"}) without (job) > bool 1e3 or absent({__name__="d", j="k"})'
        ' unless count_values("v", e) and topk(3, f @ start()) * max_over_time(g[1h:1m])'
        " # h is a comment\n + sum without(i) (j) - 0x1F"
    )
    found = selectors(substitute(expr, {"v": ".*", "__rate_interval": "5m"}))
    assert [s.name for s in found] == ["a_bucket", "b", "c", "d", "e", "f", "g", "j"]
    assert found[0].promql() == 'a_bucket{cmd="read", x=~".*"}'
    assert found[2].matchers == 's="x{y}"'
    with pytest.raises(ValueError, match="no value"):
        substitute("rate(x[$__unknown])", {})
    with pytest.raises(ValueError, match="cannot read"):
        selectors("x ; y")


def test_dashboard_is_grafana_json_with_a_datasource_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # Grafana's own (`__` prefixed) and the dashboard's variables are all the test fills in.
    assert set(variables) - {"datasource"} <= set(GRAFANA_VALUES)
    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        # no two panels overlap on Grafana's 24-column grid
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (
                f"{panel['title']!r} must use the datasource variable"
            )
    wanted = {
        "pageserver_used_bytes",
        "pageserver_capacity_bytes",
        "placement_slabs",
        "client_nbd_requests_total",
        "client_nbd_request_duration_seconds_bucket",
        "client_replica_failovers_total",
        "mirror_write_lag_seconds",
        "placement_rereplication_bytes_total",
    }
    used = {s.name for expr in dashboard_queries() for s in selectors(expr)}
    assert wanted <= used, f"the dashboard lacks {sorted(wanted - used)}"


# -- the cluster and Prometheus -------------------------------------------------------------


@dataclass
class Prometheus:
    """A Prometheus server on loopback, reached through its HTTP API."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the parser's error
            body = json.loads(exc.read())
            raise AssertionError(f"{path} {params}: {body.get('error')}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def wait(self, what: str, done: Any) -> Any:
        """Poll `done()` until it returns something true; fail with the log after TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()}"
            value = done()
            if value:
                return value
            time.sleep(0.1)  # polling Prometheus's API, not waiting blindly
        raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()[-4000:]}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_prometheus(work: Path, targets: Path) -> Prometheus:
    """Start Prometheus scraping `targets` (file_sd) with the alert rules; wait until ready."""
    binary = need("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": SCRAPE_INTERVAL,
                    "scrape_timeout": SCRAPE_INTERVAL,
                    "evaluation_interval": SCRAPE_INTERVAL,
                },
                "rule_files": [str(ALERTS)],
                # the file sets each target's job; this job_name is only the default
                "scrape_configs": [
                    {"job_name": "remem", "file_sd_configs": [{"files": [str(targets)]}]}
                ],
            }
        )
    )
    log = work / "prometheus.log"
    for _attempt in range(3):  # the free port may be taken before Prometheus binds it
        port = free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        prometheus = Prometheus(f"http://127.0.0.1:{port}", proc, log)
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return prometheus
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)  # polling the ready endpoint
        stop_process(proc, signal.SIGTERM)
        if "address already in use" not in log.read_text():
            break
    raise AssertionError(f"prometheus did not become ready:\n{log.read_text()[-4000:]}")


def stop_process(proc: subprocess.Popen[Any], sig: int) -> int | None:
    """Send `sig` and wait; SIGKILL after 60 s. Returns the exit status, None if killed."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return None


def drive_io(uri: str) -> None:
    nbdsh = need("nbdsh")
    # nbdsh runs `python3 -m nbd`: the libnbd bindings are in the system Python, not the venv.
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    result = subprocess.run(
        [nbdsh, "-u", uri, "-c", NBD_IO], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0 and "io ok" in result.stdout, result.stderr


def parse_time(stamp: str) -> datetime:
    """Prometheus's RFC 3339 times, with up to nanoseconds (datetime keeps microseconds)."""
    match = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    assert match, stamp
    base, fraction, zone = match.groups()
    moment = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
    return moment + timedelta(microseconds=int((fraction or "0")[:6].ljust(6, "0")))


def stop_cluster(up: ServiceProcess) -> None:
    """SIGINT, as Ctrl-C would, and wait: `remem up` stops its children and exits 0."""
    status = stop_process(up.proc, signal.SIGINT)
    if up.reader is not None:
        up.reader.join(timeout=10)
    assert status == 0, f"remem up exited with {status}:\n{up.log()}"
    # a stale file would have a Prometheus scrape dead ports (and raise *Down alerts)
    assert not Path(up.ready["metrics_targets"]).exists(), "remem up left its targets file"


@pytest.fixture(scope="module")
def prometheus() -> Iterator[Prometheus]:
    """Prometheus scraping a `remem up` that served some NBD I/O, every rule evaluated."""
    with ExitStack() as cleanup:
        # Short paths: remem up puts Unix sockets in the state dir (108-byte limit).
        work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="remem-dash-")))
        shm = Path(tempfile.mkdtemp(prefix="remem-dash-", dir="/dev/shm"))
        cleanup.callback(shutil.rmtree, shm, ignore_errors=True)
        up = start_service(
            "remem-up",
            ["up", "--state-dir", str(work / "state"), "--shm-dir", str(shm),
             "--size", "64MiB", "--forget"],
            timeout=180,
        )  # fmt: skip
        cleanup.callback(stop_cluster, up)
        drive_io(up.ready["nbd_uri"])
        targets = Path(up.ready["metrics_targets"])
        expected = len(json.loads(targets.read_text()))
        assert expected == len(up.ready["processes"].split(",")), targets.read_text()
        server = start_prometheus(work, targets)
        cleanup.callback(stop_process, server.proc, signal.SIGTERM)

        def all_up() -> bool:
            active = server.api("targets", state="active")["activeTargets"]
            return len(active) == expected and all(t["health"] == "up" for t in active)

        server.wait(f"{expected} targets up", all_up)
        # three scrapes of every target: rate() over them has two intervals
        server.wait(
            "three scrapes of every target",
            lambda: server.query('min(count_over_time(up{job=~"remem-.+"}[1h])) >= 3'),
        )
        active = server.api("targets", state="active")["activeTargets"]
        scraped = max(parse_time(target["lastScrape"]) for target in active)

        def evaluated_since_scraped() -> bool:
            groups = server.api("rules")["groups"]
            return bool(groups) and all(parse_time(g["lastEvaluation"]) > scraped for g in groups)

        server.wait("every rule group evaluated after the scrapes", evaluated_since_scraped)
        yield server


@pytest.mark.timeout(300)
def test_every_job_of_the_alert_rules_is_scraped(prometheus: Prometheus) -> None:
    jobs = {t["labels"]["job"] for t in prometheus.api("targets")["activeTargets"]}
    assert jobs == set(JOBS)


@pytest.mark.timeout(300)
def test_every_queried_metric_exists(prometheus: Prometheus) -> None:
    wanted = queried_selectors()
    names = sorted({s.name for s in wanted})
    missing_names = [n for n in names if not prometheus.query(f'count({{__name__="{n}"}})')]
    assert not missing_names, f"metrics queried but not exported: {missing_names}"
    # The label values too: a typo in `state="degraded"` selects nothing, silently.
    missing = [s.promql() for s in wanted if not prometheus.query(f"count({s.promql()})")]
    assert not missing, f"selectors with no series on a running cluster: {missing}"
    print(f"{len(names)} metric names, {len(wanted)} selectors found on the cluster")


@pytest.mark.timeout(300)
def test_every_dashboard_query_returns_data(prometheus: Prometheus) -> None:
    empty = [expr for expr in dashboard_queries() if not prometheus.query(expr)]
    assert not empty, f"dashboard queries with no result on a running cluster: {empty}"


@pytest.mark.timeout(300)
def test_healthy_cluster_raises_no_alert(prometheus: Prometheus) -> None:
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == set(alert_exprs())
    broken = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not broken, f"rules that failed to evaluate: {broken}"
    alerts = prometheus.api("alerts")["alerts"]
    assert not alerts, f"a healthy cluster raised alerts: {json.dumps(alerts, indent=1)}"
    firing = {name: r for name, expr in alert_exprs().items() if (r := prometheus.query(expr))}
    assert not firing, f"alert expressions true on a healthy cluster: {firing}"

"""The alert rules and the Grafana dashboards of ``compose/``, against the real Prometheus.

- ``promtool check rules`` and ``promtool test rules`` (every alert fires in one case and stays
  silent in another: the cases are in ``compose/prometheus/alerts_test.yml``);
- every metric name a dashboard panel or an alert uses is in the catalogue
  (``gigafactory/metrics.py``), the recording rules, or the NATS exporter's names;
- a live fleet (a real ``nats-server``, a coordinator and a factory as real processes, each with
  ``--metrics-port``) scraped by a real ``prometheus`` on loopback runs jobs; then every panel's
  query and every alert expression must parse on that server and every metric name it uses must
  exist there (as series: the jobs are chosen so that every family used has one; the NATS
  exporter's names are checked as the /varz fields they come from); and
  GigafactoryPoolWithoutFactory is driven to firing (the only factory SIGKILLed mid-job, its lease
  reclaimed, the job queued with no factory) and back to resolved (a factory returns and runs it).

Prometheus and promtool come from Debian's ``prometheus`` package (``.ci/run`` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import Proc, fast_env, gigafactory_cmd, kill_group, wait_until, write_job

from gigafactory.embedded import EmbeddedServer, free_port

pytestmark = pytest.mark.timeout(240)

COMPOSE = Path(__file__).resolve().parent.parent / "compose"
ALERTS = COMPOSE / "prometheus" / "alerts.yml"
ALERTS_TEST = COMPOSE / "prometheus" / "alerts_test.yml"
DASHBOARDS = COMPOSE / "grafana" / "dashboards"
DATASOURCES = COMPOSE / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = COMPOSE / "grafana" / "provisioning" / "dashboards" / "provider.yml"

EXPORTER_METRICS = {
    # prometheus-nats-exporter -varz flattens the server's /varz JSON into gnatsd_varz_<path>: these
    # two come from jetstream.stats.storage and jetstream.config.max_storage. No exporter runs here
    # (it is not packaged for Debian or PyPI), so the live test checks those /varz fields on the real
    # server instead of the exported names.
    "gnatsd_varz_jetstream_stats_storage": ("jetstream", "stats", "storage"),
    "gnatsd_varz_jetstream_config_max_storage": ("jetstream", "config", "max_storage"),
}
PROMETHEUS_OWN = {"up"}
"""Series Prometheus makes itself for every target."""

GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$factory": ".+"}
"""What Grafana puts in place of the dashboards' variables (10s: a few 1s scrapes)."""

METER_CLI = """#!/bin/sh
# An agent CLI stand-in: reports one model request's tokens and cost as a JSON line.
if [ "$1" = "--version" ]; then echo "meter version 1.0.0"; exit 0; fi
echo '{"type": "usage", "model": "meter-model", "usage": {"input": 1000, "output": 200}, "cost": 0.25}'
"""
METER_DECLARATION = {
    "name": "meter", "engine-class": "agentic-coder", "description": "reports usage and cost, does nothing else",
    "binary": "meter", "version-args": ["--version"], "version-regex": r"version (\d+\.\d+\.\d+)",
    "args": ["{prompt}"], "prompt": "argv", "default-model": "meter-model",
    "output": {"format": "jsonl", "event-type": "type", "usage-events": ["usage"], "input-tokens": "usage.input",
               "output-tokens": "usage.output", "cost-usd": "cost", "model": "model"},
}
"""A declared engine (``engines_dir``) whose runs carry usage: the tokens and cost families get series."""

METADATA_ONLY: set[str] = {"gigafactory_halted"}
"""Metric names the live test accepts without series (only their TYPE and HELP scraped):
``gigafactory_halted`` has a series only while a halt is in force (GigafactoryHalted's rule is
proven by its promtool unit test); the jobs above touch every other family a dashboard or an
alert uses."""

WAIT_S = 60.0
"""Bound of every wait on the live fleet or on Prometheus (scrapes and rule evaluations run every
second; a loaded two-core machine may need far more than that)."""


# -- reading the files -------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: install Debian's prometheus package (apt-get install -y prometheus)"
    return path


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r]


def recording_rules() -> set[str]:
    return {r["record"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "record" in r}


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, query) for every target of every panel, and the query of
    every templating variable (``label_values(METRIC, LABEL)`` as the selector ``METRIC``)."""
    out = []
    for name, d in dashboards().items():
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((name, p["title"], t["expr"]))
        for var in d.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["query"]["query"])
                assert m, f"{name}: variable {var['name']}: expected label_values(METRIC, LABEL)"
                out.append((name, f"variable ${var['name']}", m.group(1)))
    return out


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable the test does not know in {expr!r}"
    return expr


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
             "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (pure; enough of PromQL for our files:
    strings, label matchers, ranges and grouping clauses are removed, then every identifier that
    is not a function call or a keyword is a metric name)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", s):
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def all_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard query and every rule expression."""
    out = [(f"{f} / {title}", grafana_to_promql(q)) for f, title, q in panel_queries()]
    for g in yaml.safe_load(ALERTS.read_text())["groups"]:
        for r in g["rules"]:
            out.append((f"alerts.yml / {r.get('alert') or r.get('record')}", r["expr"]))
    return out


# -- the files alone ---------------------------------------------------------------------------


def test_metric_names_finds_selectors_and_skips_functions_labels_and_keywords():
    expr = ('sum by (pool) (max without (instance, job) (rate(gigafactory_claims_total{factory=~"a.b"}[5m])))'
            ' / on () group_left (x) gigafactory:spend_budget_usd_per_hour > 0.8 unless gigafactory_ready offset 15m')
    assert metric_names(expr) == {"gigafactory_claims_total", "gigafactory:spend_budget_usd_per_hour",
                                  "gigafactory_ready"}
    assert metric_names('absent(up{job="x"} == 1)') == {"up"}
    assert metric_names("vector(25)") == set()


def test_promtool_checks_the_rules():
    r = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules()) + len(recording_rules())} rules found" in r.stdout, r.stdout


def test_promtool_unit_tests_pass_and_every_alert_fires_in_one_and_stays_silent_in_another():
    r = subprocess.run([promtool(), "test", "rules", ALERTS_TEST.name], capture_output=True, text=True,
                       timeout=120, cwd=ALERTS_TEST.parent)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    fires, silent = set(), set()
    for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in t.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts without a firing case in alerts_test.yml"
    assert names - silent == set(), "alerts without a silent case in alerts_test.yml"


def test_every_alert_has_a_severity_summary_description_and_runbook_that_names_a_command():
    for r in alert_rules():
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        ann = r["annotations"]
        assert {"summary", "description", "runbook"} <= ann.keys(), r["alert"]
        assert re.search(r"`(gigafactory|nats) [^`]+`", ann["runbook"]), f"{r['alert']}: the runbook names no command"


def test_dashboards_and_alerts_use_only_names_from_the_catalogue():
    from gigafactory.metrics import CATALOGUE

    known = set(PROMETHEUS_OWN) | set(EXPORTER_METRICS) | recording_rules()
    for spec in CATALOGUE:
        known |= ({f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"} if spec.kind == "histogram"
                  else {spec.name})
    unknown = {(where, n) for where, q in all_queries() for n in metric_names(q) if n not in known}
    assert unknown == set()
    used = {n for _, q in all_queries() for n in metric_names(q)}
    assert len(used) > 30, sorted(used)  # the extraction found the queries' names at all


def test_grafana_provisioning_points_the_dashboards_at_the_provisioned_datasource():
    [ds] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http")
    [provider] = yaml.safe_load(PROVIDER.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    boards = dashboards()
    assert {"fleet-overview.json", "factory.json", "reliability.json", "economics.json"} <= boards.keys()
    uids = [d["uid"] for d in boards.values()]
    assert len(set(uids)) == len(uids), uids
    for name, d in boards.items():
        ids = [p["id"] for p in d["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        for p in d["panels"]:
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == ds["uid"], f"{name} / {p['title']}"
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), f"{name} / {p['title']}"
    assert any(v["name"] == "factory" for v in boards["factory.json"]["templating"]["list"])


# -- the live fleet -----------------------------------------------------------------------------


class Prometheus:
    """A real ``prometheus`` on a free loopback port, scraping the given targets every second and
    evaluating the rule file every second."""

    def __init__(self, root: Path, targets: dict[str, list[str]], rule_file: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rule_file)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addrs}]}
                               for job, addrs in targets.items()],
        }
        root.mkdir(parents=True, exist_ok=True)
        conf = root / "prometheus.yml"
        conf.write_text(yaml.safe_dump(config))
        binary = shutil.which("prometheus")
        assert binary, "prometheus not found: install Debian's prometheus package (apt-get install -y prometheus)"
        self.proc = Proc([binary, f"--config.file={conf}", f"--storage.tsdb.path={root / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{self.port}"], root / "prometheus.log")
        wait_until(self.ready, WAIT_S, what=f"prometheus ready on {self.url}\n{self.proc.output()[-2000:]}")

    def ready(self) -> bool:
        assert self.proc.alive(), f"prometheus exited:\n{self.proc.output()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; returns the decoded body, errors (HTTP 400, 422) included."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def value(self, query: str) -> float | None:
        res = self.api("query", query=query)
        assert res["status"] == "success", (query, res)
        return float(res["data"]["result"][0]["value"][1]) if res["data"]["result"] else None

    def alerts(self, name: str) -> list[dict]:
        return [a for a in self.api("alerts")["data"]["alerts"] if a["labels"]["alertname"] == name]

    def close(self) -> None:
        self.proc.close()


class LiveFleet:
    """A nats-server (with its monitoring port), a coordinator and a factory as real processes,
    each with --metrics-port, and a Prometheus scraping them."""

    FACTORY = "prom-f1"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repo = root / "repo"
        self.repo.mkdir()
        self.nats = EmbeddedServer(store_dir=str(root / "nats"), log_file=str(root / "nats.log"), http_port=0).start()
        self.env = fast_env()
        self.env["GIGAFACTORY_HOME"] = str(root / "home")
        self.env.pop("GIGAFACTORY_NATS_URL", None)
        self.env.pop("GIGAFACTORY_METRICS_PORT", None)
        bin_dir, engines_dir = root / "bin", root / "engines"
        bin_dir.mkdir()
        engines_dir.mkdir()
        (bin_dir / "meter").write_text(METER_CLI)
        (bin_dir / "meter").chmod(0o755)
        (engines_dir / "meter.yaml").write_text(yaml.safe_dump(METER_DECLARATION, sort_keys=False))
        self.env["PATH"] = f"{bin_dir}:{self.env.get('PATH', '')}"
        self.env["GIGAFACTORY_ENGINES_DIR"] = str(engines_dir)
        self.coordinator_port, self.factory_port = free_port(), free_port()
        self.procs: dict[str, Proc] = {}
        self.prometheus: Prometheus | None = None

    def start_coordinator(self) -> None:
        self.procs["coordinator"] = Proc(
            [*gigafactory_cmd(), "coordinator", "--nats", self.nats.url, "--metrics-port", str(self.coordinator_port)],
            self.root / "coordinator.log", self.env)

    def start_factory(self, n: int = 1) -> None:
        self.procs["factory"] = Proc(
            [*gigafactory_cmd(), "factory", "--nats", self.nats.url, "--id", self.FACTORY,
             "--stations", "2", "--seat", "shell=2", "--data-dir", str(self.root / "factory-data"),
             "--workspace", str(self.root / "work"), "--metrics-port", str(self.factory_port)],
            self.root / f"factory-{n}.log", self.env)

    def start_prometheus(self, rule_file: Path) -> None:
        self.prometheus = Prometheus(self.root / "prometheus", {
            "gigafactory-coordinator": [f"127.0.0.1:{self.coordinator_port}"],
            "gigafactory-factory": [f"127.0.0.1:{self.factory_port}"],
        }, rule_file)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([*gigafactory_cmd(), *args, "--nats", self.nats.url], env=self.env, capture_output=True,
                           text=True, timeout=WAIT_S, stdin=subprocess.DEVNULL)
        assert r.returncode == 0 or not check, (f"gigafactory {' '.join(args)} exited {r.returncode}\n"
                                                f"{r.stdout}\n{r.stderr}\n{self.logs()}")
        return r

    def submit(self, name: str, script: str, **manifest) -> str:
        manifest.setdefault("cwd", str(self.repo))
        f = write_job(self.root / "jobs", name, script, **manifest)
        return json.loads(self.cli("submit", "--json", str(f)).stdout)["jobs"][0]["job"]

    def record(self, job: str) -> dict:
        return json.loads(self.cli("status", "--json", job).stdout)["record"]

    def stage(self, job: str) -> str:
        return self.record(job)["stage"]

    def factory_live(self) -> bool:
        r = self.cli("factories", "--json", check=False)
        if r.returncode != 0:  # the coordinator is not answering yet
            return False
        factories = json.loads(r.stdout)["factories"]
        return any(f["id"] == self.FACTORY and f["live"] for f in factories)

    def logs(self) -> str:
        procs = dict(self.procs)
        if self.prometheus:
            procs["prometheus"] = self.prometheus.proc
        return "\n".join(f"--- {n} ---\n{p.output()[-2500:]}" for n, p in procs.items())

    def close(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.close()
        if self.prometheus:
            self.prometheus.close()
        self.nats.stop()


def test_rule_file_for_the_live_test(tmp_path):
    """The live test's copy of alerts.yml differs only in ``for`` (0s: fire at the first evaluation)."""
    copy = live_rule_file(tmp_path)
    original, fast = yaml.safe_load(ALERTS.read_text()), yaml.safe_load(copy.read_text())
    for g0, g1 in zip(original["groups"], fast["groups"], strict=True):
        for r0, r1 in zip(g0["rules"], g1["rules"], strict=True):
            assert {k: v for k, v in r0.items() if k != "for"} == {k: v for k, v in r1.items() if k != "for"}
            assert r1.get("for", "0s") == "0s"


def live_rule_file(root: Path) -> Path:
    rules = yaml.safe_load(ALERTS.read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            if "for" in r:
                r["for"] = "0s"
    path = root / "alerts-for-0s.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@pytest.fixture
def live_fleet(tmp_path):
    fleet = LiveFleet(tmp_path)
    try:
        # An invoice for the meter engine's spend, imported before the coordinator starts: its
        # first ledger pass (at start) then exports the invoice drift gauges.
        invoice = tmp_path / "meter-invoice.csv"
        invoice.write_text(f"period,model,tokens,amount\n{time.strftime('%Y-%m', time.gmtime())},meter-model,1200,0.30\n")
        fleet.cli("invoices", "import", str(invoice), "--provider", "meter")
        fleet.start_coordinator()
        fleet.start_factory()
        fleet.start_prometheus(live_rule_file(tmp_path))
        try:
            wait_until(fleet.factory_live, WAIT_S, what="the coordinator answers and the factory is live")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{fleet.logs()}") from None
        yield fleet
    finally:
        fleet.close()


def test_live_fleet_every_query_parses_and_its_metrics_exist_and_an_alert_fires_and_resolves(live_fleet):
    fleet, prom = live_fleet, live_fleet.prometheus
    assert prom is not None
    # Jobs that leave traces in every family they can: shipped, retried then dead-lettered, failed,
    # and one whose engine reports tokens and cost.
    shipped = fleet.submit("ship.md", "echo ok", review_policy="auto", product="web")
    dead = fleet.submit("dead.md", "echo ok", verify="false", review_policy="auto", product="web",
                        retry={"max": 1, "backoff": "1s"})
    failed = fleet.submit("fail.md", "exit 3", review_policy="auto", product="api", retry={"max": 0, "on": []})
    metered = fleet.submit("meter.md", "Say hello.", engine="meter", review_policy="auto", product="web")
    for job, want in ((shipped, "shipped"), (dead, "dead_letter"), (failed, "failed"), (metered, "shipped")):
        wait_until(lambda: fleet.stage(job) == want, WAIT_S, what=f"job {job} reaches {want}\n{fleet.logs()}")
    # An operator's requeue of the dead letter (it dead-letters again).
    fleet.cli("requeue", dead)
    wait_until(lambda: fleet.stage(dead) == "dead_letter" and len(fleet.record(dead)["attempts"]) == 4, WAIT_S,
               what=f"the requeued job {dead} dead-letters again\n{fleet.logs()}")

    # Prometheus has scraped both processes after those jobs ended, and evaluated the rules.
    wait_until(lambda: prom.value('sum(gigafactory_jobs_shipped_total{product="web"})') == 2
               and prom.value('sum(gigafactory_dead_letters_total{product="web"})') == 2
               and prom.value('sum(gigafactory_requeues_total{product="web"})') == 1
               and prom.value('sum(gigafactory_cost_usd_total{engine="meter"})') == 0.25, WAIT_S,
               what=f"prometheus scraped the finished jobs\n{fleet.logs()}")
    # The budget governor's daily budget (default 3000 USD a month / 30 days, neutral signals) per hour.
    wait_until(lambda: abs((prom.value("gigafactory:spend_budget_usd_per_hour") or 0) - 100 / 24) < 1e-6, WAIT_S,
               what="rules evaluated")
    for job in ("gigafactory-coordinator", "gigafactory-factory"):
        # Prometheus starts its scrape pools a few seconds after it is ready (target updates are batched).
        wait_until(lambda: prom.value(f'up{{job="{job}"}}') == 1, WAIT_S, what=f"{job} scraped\n{fleet.logs()}")

    # The alert: the only factory dies (SIGKILL) while it runs a job; the reaper reclaims the lease
    # and requeues the job, which now waits in a pool without a live factory.
    marker = fleet.repo / "attempt-started"
    waiting = fleet.submit("waiting.md", f"test -f {marker} || {{ touch {marker}; sleep 60; }}",
                           review_policy="auto", product="web")
    wait_until(marker.exists, WAIT_S, what=f"job {waiting} runs\n{fleet.logs()}")
    factory = fleet.procs["factory"]
    kill_group(factory.pid)
    factory.wait(WAIT_S)
    firing = wait_until(lambda: [a for a in prom.alerts("GigafactoryPoolWithoutFactory") if a["state"] == "firing"],
                        WAIT_S, what=f"GigafactoryPoolWithoutFactory fires\n{fleet.logs()}")
    rec = fleet.record(waiting)
    assert rec["stage"] == "queued" and [a["outcome"] for a in rec["attempts"]] == ["lease_expired"], rec["attempts"]
    assert [a["labels"]["pool"] for a in firing] == [rec["pool"]]
    assert firing[0]["labels"]["severity"] == "critical"
    assert "gigafactory factories" in firing[0]["annotations"]["runbook"]
    wait_until(lambda: prom.value('sum(gigafactory_leases_reclaimed_total{product="web"})') == 1, WAIT_S,
               what="the reclaimed lease is scraped")

    # A factory comes back and runs the job: the alert resolves.
    fleet.start_factory(2)
    wait_until(lambda: fleet.stage(waiting) == "shipped", WAIT_S, what=f"the waiting job ships\n{fleet.logs()}")
    wait_until(lambda: prom.alerts("GigafactoryPoolWithoutFactory") == [], WAIT_S,
               what=f"GigafactoryPoolWithoutFactory resolves\n{fleet.logs()}")
    # Quiet in the negative space too: nothing else fires on this fleet but the dead letters it made
    # (a factory's own down-time does not page: only coordinators have an up alert).
    others = {a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"] if a["state"] == "firing"}
    assert others <= {"GigafactoryDeadLetters"}, others

    # The kill switch, briefly: the economics dashboard's security row draws gigafactory_halted.
    fleet.cli("halt", "--drain", "--reason", "dashboard series")
    wait_until(lambda: prom.value('max(gigafactory_halted{scope="fleet"})') == 1, WAIT_S,
               what=f"the halt is scraped\n{fleet.logs()}")
    fleet.cli("resume")

    # Every query parses on the real server.
    bad = {}
    for where, q in all_queries():
        res = prom.api("query", query=q)
        if res["status"] != "success":
            bad[where] = (q, res.get("error"))
    assert bad == {}

    # Every metric name used exists on the live server: it has series, or (a labelled family that
    # no event of this test touches) Prometheus scraped its TYPE and HELP from a live target.
    start = time.time() - 900
    with_series, metadata_only, missing = set(), set(), set()
    for name in sorted({n for _, q in all_queries() for n in metric_names(q)} - set(EXPORTER_METRICS)):
        res = prom.api("series", **{"match[]": name, "start": start})
        if res["status"] == "success" and res["data"]:
            with_series.add(name)
            continue
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        meta = prom.api("metadata", metric=family)
        if meta["status"] == "success" and meta["data"].get(family):
            metadata_only.add(name)
        else:
            missing.add(name)
    assert missing == set(), f"metrics used but not exported by the live fleet; with series: {sorted(with_series)}"
    assert metadata_only <= METADATA_ONLY, f"expected series for {sorted(metadata_only - METADATA_ONLY)}"
    # The NATS exporter's names come from these /varz fields of the real server.
    with urllib.request.urlopen(f"{fleet.nats.monitor_url}/varz", timeout=10) as r:
        varz = json.loads(r.read())
    for name, path in EXPORTER_METRICS.items():
        node = varz
        for key in path:
            assert isinstance(node, dict) and key in node, f"{name}: /varz has no {'.'.join(path)}"
            node = node[key]
        assert isinstance(node, (int, float)), (name, node)

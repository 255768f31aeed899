"""compose/: what CI can check of a multi-host deployment without a Docker engine.

- ``docker-compose config`` (Debian's docker-compose 1.29) accepts compose/docker-compose.yml,
  and the resolved file has the deployment the issue asks for: three JetStream nodes each on
  its own configuration and volume, every gigafactory service on all three URLs with R3, two
  coordinators, a factory service that scales, exporters on each node's monitoring port,
  Prometheus with its rules, Grafana with its provisioning, nats-box;
- ``promtool check config`` accepts compose/prometheus/prometheus.yml with the rule files it
  names, and its scrape targets are the compose services and ports;
- ``nats-server -t`` accepts each compose/nats/n<i>.conf beside the secrets compose/setup
  writes (tests/test_compose_tls.py runs them), which are exactly what the one
  template (gigafactory/natsconf.py) renders, and the lab cluster that the cluster-failover
  chaos scenario kills nodes of runs that same template: started here for real, its nodes
  answer the health check and the JetStream endpoint that compose's healthcheck and exporters
  use;
- the Dockerfile's build context keeps what ``pip install`` needs; the example job parses.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
import subprocess
import tomllib
import urllib.request
from pathlib import Path

import click
import msgspec
import pytest
import yaml

from gigafactory import natsconf
from gigafactory.config import ENV_HOME, Settings
from gigafactory.embedded import find_nats_server
from gigafactory.testing import Cluster

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
PROMETHEUS_DIR = COMPOSE / "prometheus"
TOOL_TIMEOUT_S = 60.0
"""Bound on each external checker (docker-compose, promtool, nats-server -t)."""
GIGAFACTORY_SERVICES = ("coordinator1", "coordinator2", "factory")
COORDINATOR_METRICS_PORT, FACTORY_METRICS_PORT = 9464, 9465
"""The ports agreed for compose (issue 11): coordinators 9464, factories 9465."""
EXPORTER_PORT = 7777
NOT_SETTINGS = {"GIGAFACTORY_NATS_URL", ENV_HOME, "GIGAFACTORY_AGENT_CLIS"}
"""Variables compose sets that are not ``Settings`` fields: ``--nats``'s variable, the data
folder, and the agent CLIs' folder."""
PENDING_FROM_METRICS: dict[str, set[str]] = {"env": set(), "options": set()}
"""Names compose may use that the code does not know yet (none: every name is held to the code)."""


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run checker ``name`` (a path, or a command on PATH), bounded by TOOL_TIMEOUT_S."""
    path = name if "/" in name else shutil.which(name)
    assert path, (f"{name} is not installed: CI installs it from Debian (.ci/run: apt-get install "
                  "prometheus docker-compose); on a Debian or Ubuntu machine do the same")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)


def compose_config(path: Path = COMPOSE_FILE) -> dict:
    """The file as docker-compose resolves it (anchors merged, paths absolute), or fail with
    docker-compose's own words."""
    got = tool("docker-compose", "-f", str(path), "config")
    assert got.returncode == 0, f"docker-compose config refused {path}:\n{got.stderr}"
    return yaml.safe_load(got.stdout)


@pytest.fixture(scope="module")
def config() -> dict:
    return compose_config()


def gigafactory_command(service: dict) -> list[str]:
    """The ``gigafactory ...`` command line a service runs: a factory replica runs it through
    ``claim-identity FOLDER`` (compose/bin/claim-identity), which picks its identity first."""
    cmd = list(service["command"])
    if cmd[:2] == ["sh", "/usr/local/bin/claim-identity"]:
        cmd = cmd[3:]
    assert cmd[0] == "gigafactory", cmd
    return cmd


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return dict(env) if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


# -- docker-compose ---------------------------------------------------------------------------------


def test_docker_compose_accepts_the_file_and_refuses_a_broken_one(tmp_path, config):
    assert str(config["version"]) == "3.8"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    command: [\"gigafactory\", \"coordinator\"",
                                                       "    comand: [\"gigafactory\", \"coordinator\"", 1))
    assert broken.read_text() != COMPOSE_FILE.read_text()
    got = tool("docker-compose", "-f", str(broken), "config")
    assert got.returncode != 0 and "comand" in got.stderr


def test_three_jetstream_nodes_each_run_their_own_generated_configuration_on_their_own_volume(config):
    services = config["services"]
    volumes = set()
    for name in natsconf.COMPOSE_NODES:
        node = services[name]
        assert node["image"].startswith("nats:")
        mounts = {v.split(":")[1]: v.split(":")[0] for v in node["volumes"]}
        assert Path(mounts["/etc/nats/nats-server.conf"]) == COMPOSE / "nats" / f"{name}.conf"
        assert node["command"] == ["nats-server", "--config", "/etc/nats/nats-server.conf"]
        data = mounts[natsconf.COMPOSE_STORE_DIR]
        volumes.add(data)
        # The healthcheck asks this node's monitoring port whether JetStream is up.
        assert f"http://127.0.0.1:{natsconf.MONITOR_PORT}/healthz?js-enabled-only=true" in node["healthcheck"]["test"]
    assert len(volumes) == 3 and volumes <= set(config["volumes"]), "each node stores on a named volume of its own"


def test_every_gigafactory_service_is_on_all_three_nodes_at_r3_and_the_factories_scale(config):
    services = config["services"]
    # TLS to every node (tests/test_compose_tls.py: the CA and identities each service uses).
    urls = ",".join(f"tls://{n}:{natsconf.CLIENT_PORT}" for n in natsconf.COMPOSE_NODES)
    for name in GIGAFACTORY_SERVICES:
        s = services[name]
        env = env_of(s)
        assert env["GIGAFACTORY_NATS_URL"] == urls, name
        assert Settings.from_env(env).replicas == 3, name
        assert s["image"] == "gigafactory:local" and Path(s["build"]["context"]) == ROOT
    for name, port in (("coordinator1", COORDINATOR_METRICS_PORT), ("coordinator2", COORDINATOR_METRICS_PORT),
                       ("factory", FACTORY_METRICS_PORT)):
        # The healthcheck asks the service's own metrics endpoint.
        assert f"http://127.0.0.1:{port}/healthz" in " ".join(services[name]["healthcheck"]["test"]), name
    assert [services[c]["command"][:2] for c in ("coordinator1", "coordinator2")] == [["gigafactory", "coordinator"]] * 2
    factory = services["factory"]
    assert gigafactory_command(factory)[:2] == ["gigafactory", "factory"]
    # `--scale factory=N`: nothing a second replica would clash on, and no --id (each replica's
    # id is its container's host name).
    assert not {"hostname", "container_name", "ports"} & set(factory), factory
    assert "--id" not in factory["command"]  # its id is the identity it claims (claim-identity)
    # Scaling down stops replicas: Docker must wait out a factory's drain before it kills.
    grace_s = float(factory["stop_grace_period"].removesuffix("s"))
    assert grace_s > Settings.from_env(env_of(factory)).drain_timeout_s + 5
    assert services["nats-box"]["environment"]["NATS_URL"] == urls


def test_compose_uses_only_settings_and_options_the_code_has(config):
    """A typo in a variable (GIGAFACTORY_REPLICA) or an option would be ignored or refused only
    at ``up`` on a Docker host: hold each to the code here."""
    from gigafactory.cli import main

    known = {f"GIGAFACTORY_{f.name.upper()}" for f in msgspec.structs.fields(Settings)} | NOT_SETTINGS
    unknown_env, unknown_options = set(), set()
    for name in GIGAFACTORY_SERVICES:
        s = config["services"][name]
        unknown_env |= {k for k in env_of(s) if k not in known}
        argv = gigafactory_command(s)
        command = main.commands[argv[1]]
        options = {o for p in command.params if isinstance(p, click.Option) for o in p.opts}
        unknown_options |= {a for a in argv[2:] if a.startswith("--") and a not in options}
    assert unknown_env <= PENDING_FROM_METRICS["env"], unknown_env
    assert unknown_options <= PENDING_FROM_METRICS["options"], unknown_options


def test_the_compose_broker_runs_the_nats_server_release_the_lab_runs(config):
    """The chaos suite's cluster runs the wheel's nats-server; compose runs the image: the same
    minor release, so failover timings measured in the lab hold for the deployment."""
    out = tool(find_nats_server(), "--version").stdout
    major, minor = re.search(r"v(\d+)\.(\d+)\.", out).groups()
    for name in natsconf.COMPOSE_NODES:
        tag = config["services"][name]["image"].split(":", 1)[1]
        assert tag.startswith(f"{major}.{minor}"), (name, tag, out)


def test_observability_services_read_the_files_of_this_folder(config):
    services = config["services"]
    prom = services["prometheus"]
    assert f"{PROMETHEUS_DIR}:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    grafana = services["grafana"]
    assert f"{COMPOSE / 'grafana' / 'provisioning'}:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert f"{COMPOSE / 'grafana' / 'dashboards'}:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    for name in natsconf.COMPOSE_NODES:
        cmd = services[f"nats-exporter-{name}"]["command"]
        assert cmd[-1] == f"http://{name}:{natsconf.MONITOR_PORT}" and "-jsz=all" in cmd
        assert cmd[cmd.index("-port") + 1] == str(EXPORTER_PORT)


# -- Prometheus -----------------------------------------------------------------------------------


def promtool_check(folder: Path) -> subprocess.CompletedProcess:
    return tool("promtool", "check", "config", str(folder / "prometheus.yml"))


def test_promtool_accepts_the_prometheus_configuration_with_its_rule_files(tmp_path):
    folder = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, folder)
    got = promtool_check(folder)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "1 rule files found" in got.stdout
    assert "SUCCESS: 20 rules found" in got.stdout, got.stdout  # the real alert rules, all read
    # Without the rule file the configuration is refused: the rules are part of the check.
    (folder / "alerts.yml").unlink()
    got = promtool_check(folder)
    assert got.returncode != 0 and "alerts.yml" in got.stdout + got.stderr


def test_prometheus_scrapes_the_compose_services_on_their_metrics_ports(config):
    prom = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    targets = {job: [t for sc in j.get("static_configs", []) for t in sc["targets"]] for job, j in jobs.items()}
    services = config["services"]
    assert targets["gigafactory-coordinator"] == [f"coordinator{i}:{COORDINATOR_METRICS_PORT}" for i in (1, 2)]
    for c in ("coordinator1", "coordinator2"):
        cmd = services[c]["command"]
        assert cmd[cmd.index("--metrics-port") + 1] == str(COORDINATOR_METRICS_PORT)
    # Every factory replica, found by the service's DNS name: scaling needs no edit here.
    [sd] = jobs["gigafactory-factory"]["dns_sd_configs"]
    assert sd["names"] == ["factory"] and sd["port"] == FACTORY_METRICS_PORT and "factory" in services
    cmd = services["factory"]["command"]
    assert cmd[cmd.index("--metrics-port") + 1] == str(FACTORY_METRICS_PORT)
    assert targets["nats"] == [f"nats-exporter-{n}:{EXPORTER_PORT}" for n in natsconf.COMPOSE_NODES]
    assert all(t.split(":")[0] in services for job in ("gigafactory-coordinator", "nats") for t in targets[job])
    assert prom["rule_files"] == ["alerts.yml"]


# -- NATS -----------------------------------------------------------------------------------------


def test_the_nats_confs_are_exactly_what_the_one_template_renders():
    on_disk = {p.name: p.read_text() for p in (COMPOSE / "nats").glob("*.conf")}
    assert on_disk == natsconf.compose_files(), (
        "compose/nats/ differs from gigafactory/natsconf.py: regenerate with "
        "`python -m gigafactory.natsconf compose/nats` (and edit the template, not the files)")


def placed_with_secrets(conf: Path, folder: Path, secrets: Path) -> Path:
    """``conf`` as its node reads it, in ``folder``: the node's secrets folder (written by the
    set-up) beside it as ``secrets/`` (as /etc/nats/secrets is beside /etc/nats/nats-server.conf
    in its container), and the TLS files' absolute paths moved there; nothing else changed."""
    folder.mkdir(parents=True)
    (folder / "secrets").symlink_to(secrets / conf.stem)
    placed = folder / "nats-server.conf"
    placed.write_text(conf.read_text().replace(f'"{natsconf.COMPOSE_SECRETS_DIR}/', f'"{folder / "secrets"}/'))
    return placed


def test_nats_server_accepts_each_compose_conf_and_refuses_a_broken_one(tmp_path):
    from gigafactory.composesecrets import setup

    secrets = tmp_path / "secrets"
    setup(secrets, owner_uid=os.geteuid())
    binary = find_nats_server()
    for conf in sorted((COMPOSE / "nats").glob("*.conf")):
        got = tool(binary, "-t", "-c", str(placed_with_secrets(conf, tmp_path / conf.stem, secrets)))
        assert got.returncode == 0, f"{conf}: {got.stdout}{got.stderr}"
        assert "is valid" in got.stdout + got.stderr
    bad = tmp_path / "n1" / "nats-server.conf"
    bad.write_text(bad.read_text().replace('sync_interval: "always"', 'sync_interval: "sometimes"'))
    got = tool(binary, "-t", "-c", str(bad))
    assert got.returncode != 0 and "sync_interval" in got.stdout + got.stderr
    # Without the users the set-up writes, a node does not start (it never runs open).
    (secrets / "n2" / "users.conf").unlink()
    got = tool(binary, "-t", "-c", str(tmp_path / "n2" / "nats-server.conf"))
    assert got.returncode != 0 and "users.conf" in got.stdout + got.stderr


def placed_like_compose(lab: natsconf.NodeConf, compose: natsconf.NodeConf) -> natsconf.NodeConf:
    """``lab`` moved to where ``compose`` runs: its placement (addresses, ports, folders, names)
    and the site's security material (TLS files, identities: the lab runs without; see
    tests/test_compose_tls.py for the compose cluster with them) replaced, nothing else."""
    return dataclasses.replace(lab, **{f: getattr(compose, f) for f in natsconf.PLACEMENT + natsconf.SITE_SECURITY})


@pytest.mark.timeout(120)
def test_the_lab_cluster_of_the_chaos_suite_runs_the_compose_configuration(tmp_path):
    """The cluster-failover scenario's cluster (ClusterLab -> Cluster) is the compose cluster
    placed on loopback: moved to the containers' addresses, each node's configuration is the
    compose file byte for byte (fsync policy included). Started for real, each node answers the healthcheck compose
    runs and the JetStream endpoint the exporters scrape, on the monitoring port the template
    gives it."""
    from gigafactory.chaos.cluster_lab import ClusterLab
    from gigafactory.chaos.scenarios.cluster import DEPLOYED

    # As the scenario builds it (chaos/scenarios/cluster.py: cluster_failover).
    lab = ClusterLab(tmp_path / "lab", seed=0, sync_interval=DEPLOYED.sync_interval)
    lab.cluster._build()
    files = natsconf.compose_files()
    for lab_node, compose_node in zip(lab.cluster.node_confs(), natsconf.compose_nodes(), strict=True):
        assert natsconf.shape(lab_node) == natsconf.shape(compose_node)
        text = natsconf.render(placed_like_compose(lab_node, compose_node))
        assert natsconf.COMPOSE_HEADER + text == files[f"{compose_node.server_name}.conf"]

    with Cluster(str(tmp_path / "cluster")) as c:
        assert [natsconf.shape(n) for n in c.node_confs()] == [natsconf.shape(n) for n in natsconf.compose_nodes()]
        for n in c.nodes:
            with urllib.request.urlopen(f"{n.monitor_url}/healthz?js-enabled-only=true", timeout=5) as r:
                assert r.status == 200 and json.load(r)["status"] == "ok"
            with urllib.request.urlopen(f"{n.monitor_url}/jsz", timeout=5) as r:
                jsz = json.load(r)
            assert jsz["meta_cluster"]["cluster_size"] == 3, jsz.get("meta_cluster")
            assert jsz["config"]["store_dir"] == str(Path(n.store_dir) / "jetstream")


def test_the_template_refuses_values_a_configuration_cannot_hold():
    node = natsconf.compose_nodes()[0]
    with pytest.raises(natsconf.NatsConfError, match="store_dir=.*contains"):
        natsconf.render(dataclasses.replace(node, store_dir='/data" \njetstream: false'))
    with pytest.raises(natsconf.NatsConfError, match="cluster_port=70000 is not a TCP port"):
        natsconf.render(dataclasses.replace(node, cluster_port=70000))
    with pytest.raises(natsconf.NatsConfError, match="sync_interval"):
        natsconf.render(dataclasses.replace(node, sync_interval="2m; jetstream: false"))
    with pytest.raises(natsconf.NatsConfError, match="more than 4096"):
        natsconf.render(dataclasses.replace(node, server_name="n" * 5000))
    # The valid values of a single server render no cluster block at all.
    single = natsconf.render(dataclasses.replace(node, cluster_name=None, cluster_port=None, routes=()))
    assert "cluster {" not in single and 'store_dir: "/data"' in single


# -- the image and the example job ----------------------------------------------------------------


def dockerignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_the_image_build_context_keeps_everything_pip_install_needs():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", py["project"]["readme"], "scripts/install-agent-clis",
              *py["tool"]["setuptools"]["package-dir"].values()}
    excluded = sorted(p for p in needed if dockerignored(p, patterns))
    assert not excluded, f".dockerignore keeps {excluded} out of the image's build context"
    assert dockerignored("tests", patterns) and dockerignored(".venv", patterns)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert "pip install --no-cache-dir /src" in dockerfile and "ARG AGENT_CLIS=0" in dockerfile
    assert re.search(r"^USER gigafactory$", dockerfile, re.M), "engines do not run as root"


def test_the_compose_example_job_is_valid():
    from gigafactory.schemas.manifest import parse_job_file

    job = parse_job_file(str(COMPOSE / "jobs" / "hello.md"))
    assert job.manifest.engine == "shell" and job.manifest.review_policy == "auto"


def test_alert_rules_and_dashboards_name_only_scrape_jobs_prometheus_has():
    """``up{job="..."}`` in a rule or a panel that names no job of prometheus.yml never fires
    and never draws: hold the rules and dashboards of compose/ to the scrape configuration."""
    prom = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    sources = [p for p in PROMETHEUS_DIR.glob("*.yml") if p.name != "prometheus.yml"]
    sources += list((COMPOSE / "grafana").rglob("*.json"))
    named = {(p.name, m) for p in sources for m in re.findall(r'job\s*=~?\s*\\?"([^"\\]+)', p.read_text())}
    assert not {(f, j) for f, j in named if j not in jobs}, f"jobs named but not scraped ({sorted(jobs)}): {named}"
    assert jobs >= {"gigafactory-coordinator", "gigafactory-factory", "nats"}

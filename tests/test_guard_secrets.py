"""What an engine's environment holds: only what it needs, never the factory's broker
credentials, credentials file or identity (issue 12, "Secrets")."""

from __future__ import annotations

import pytest
from helpers import Fleet, eventually, run

from gigafactory.factory.engines.base import base_environment, strip_url_credentials

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("urls, expected", [
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("nats://gf:s3cret@127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("tls://tok3n@h:4222", "tls://h:4222"),
    ("nats://a:p@h1:4222, nats://b:q@h2:4222", "nats://h1:4222,nats://h2:4222"),
    ("u:p@h:4222", "h:4222"),
    ("nats://h:4222/x@y", "nats://h:4222/x@y"),  # an @ after the host is not userinfo
])
def test_strip_url_credentials_keeps_the_address_only(urls, expected):
    assert strip_url_credentials(urls) == expected


def test_factory_only_variables_never_pass_even_when_named():
    environ = {"PATH": "/bin", "GIGAFACTORY_NATS_URL": "nats://u:p@h", "GIGAFACTORY_CREDS": "/c.creds",
               "NATS_CREDS": "/n.creds", "NATS_URL": "nats://u:p@h", "NPM_TOKEN": "n"}
    env = base_environment(environ, ["GIGAFACTORY_CREDS", "NATS_CREDS", "NATS_URL", "NPM_TOKEN"])
    assert env == {"PATH": "/bin", "NPM_TOKEN": "n"}


def test_a_real_job_sees_no_broker_password_credentials_or_identity(nats_server, tmp_path, monkeypatch):
    """The factory connects with its own identity (a credentials file), the environment holds
    the test's admin credentials and NATS tool variables too; the job dumps its whole
    environment into its folder, then fences through its socket: it holds as the lease's holder
    without any of the factory's secrets."""
    import os

    admin_creds = os.environ["GIGAFACTORY_CREDS"]  # the lab's admin (conftest)
    monkeypatch.setenv("NATS_CREDS", str(tmp_path / "nats.creds"))
    monkeypatch.setenv("NATS_URL", "nats://gf:hunter2pass@127.0.0.1:1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-api03-notforthisjob")
    host = nats_server.url.split("://", 1)[1]

    async def main():
        async with Fleet(nats_server.url, tmp_path, server=nats_server) as fleet:
            f1 = await fleet.add_factory("f1")
            factory_creds = f1.settings.creds
            assert factory_creds and factory_creds != admin_creds
            seeds = [line.strip() for p in (factory_creds, admin_creds) for line in open(p)
                     if line.strip().startswith("SU")]
            assert seeds, "the credentials files hold nkey seeds"
            job = await fleet.submit_one(fleet.job(
                'env > "$PWD/env.txt"; gigafactory fence; echo "fence $?" > "$PWD/fence.txt"', review_policy="auto"))
            await fleet.wait_stage(job, "shipped", timeout_s=30)
            env = dict(line.split("=", 1) for line in (fleet.repo / "env.txt").read_text().splitlines()
                       if "=" in line)
            text = (fleet.repo / "env.txt").read_text()
            assert env["GF_JOB_ID"] == job  # the dump is real and complete
            assert env["GIGAFACTORY_NATS_URL"] == f"nats://{host}", "the broker's address only"
            for secret in ("hunter2pass", "nats.creds", "sk-ant-api03-notforthisjob", factory_creds, admin_creds,
                           os.path.basename(factory_creds), *seeds):
                assert secret not in text, secret
            assert not any(k.startswith("NATS_") or k in ("GIGAFACTORY_CREDS", "ANTHROPIC_API_KEY") for k in env)
            assert (fleet.repo / "fence.txt").read_text().split() == ["fence", "0"], "the job fenced as holder"
            await eventually(lambda: not os.path.exists(env["GF_FENCE_SOCKET"]), 10,
                             what="the socket removed with its attempt (after its result)")

    run(main())

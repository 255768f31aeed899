"""What an engine's environment holds: only what it needs, never the factory's broker
credentials, credentials file or identity (issue 12, "Secrets")."""

from __future__ import annotations

import pytest
from helpers import Fleet, run

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
    """The factory connects with a password in its URL and has credentials in its
    environment; the job dumps its whole environment into its folder."""
    monkeypatch.setenv("GIGAFACTORY_CREDS", str(tmp_path / "factory.creds"))
    monkeypatch.setenv("GIGAFACTORY_NATS_URL", "nats://gf:hunter2pass@127.0.0.1:1")
    monkeypatch.setenv("NATS_CREDS", str(tmp_path / "nats.creds"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-api03-notforthisjob")
    host = nats_server.url.split("://", 1)[1]
    url = f"nats://gf:hunter2pass@{host}"  # no auth on the test server: it ignores the password

    async def main():
        async with Fleet(url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job('env > "$PWD/env.txt"', review_policy="auto"))
            await fleet.wait_stage(job, "shipped", timeout_s=20)
            env = dict(line.split("=", 1) for line in (fleet.repo / "env.txt").read_text().splitlines()
                       if "=" in line)
            text = (fleet.repo / "env.txt").read_text()
            assert env["GF_JOB_ID"] == job  # the dump is real and complete
            assert env["GIGAFACTORY_NATS_URL"] == f"nats://{host}", "the address for `gigafactory fence` only"
            for secret in ("hunter2pass", "factory.creds", "nats.creds", "sk-ant-api03-notforthisjob"):
                assert secret not in text, secret
            assert not any(k.startswith("NATS_") or k in ("GIGAFACTORY_CREDS", "ANTHROPIC_API_KEY") for k in env)

    run(main())

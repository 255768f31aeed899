"""``gigafactory submit`` refuses what the broker could not carry, before sending it: a clear
error naming the file and the limit, never a MaxPayloadError traceback."""

from __future__ import annotations

import subprocess

import pytest
from helpers import gigafactory_cmd, job_text

pytestmark = pytest.mark.timeout(60)


def _submit(url: str, *files, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*gigafactory_cmd(), "submit", "--nats", url, *map(str, files)],
                          capture_output=True, text=True, timeout=30, env=env)


def test_a_6mb_job_file_is_refused_naming_the_file_and_the_limit(nats_server, tmp_path):
    big = tmp_path / "big.md"
    big.write_text(job_text("echo big\n" + "#" * (6 << 20), cwd=str(tmp_path)))

    out = _submit(nats_server.url, big)

    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr and "MaxPayloadError" not in out.stderr
    assert str(big) in out.stderr
    assert "max_job_file_bytes = 524,288" in out.stderr and "GIGAFACTORY_MAX_JOB_FILE_BYTES" in out.stderr


def test_files_that_fit_one_by_one_but_not_together_are_refused_as_a_batch(nats_server, tmp_path):
    files = []
    for i in range(3):
        p = tmp_path / f"part-{i}.md"
        p.write_text(job_text("echo part\n" + "#" * 400_000, cwd=str(tmp_path)))
        files.append(p)

    out = _submit(nats_server.url, *files)

    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    assert "the 3 files make a request of" in out.stderr and "max payload" in out.stderr
    assert "smaller batches" in out.stderr


def test_a_file_within_the_limits_is_sent(nats_server, tmp_path):
    """The same command with a small file gets as far as asking the coordinator (none runs)."""
    small = tmp_path / "small.md"
    small.write_text(job_text("echo small", cwd=str(tmp_path)))

    out = _submit(nats_server.url, small)

    assert out.returncode == 4, out  # unavailable: the request may be retried
    assert "no coordinator is answering" in out.stderr

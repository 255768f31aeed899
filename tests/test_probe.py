"""Capability probe: fake tools on a private PATH, real subprocesses."""

from __future__ import annotations

import os
import platform
import stat
import sys
import time

import pytest

from gigafactory.factory.probe import (
    count_nvidia_gpus,
    describe,
    normalize_arch,
    normalize_os,
    parse_tool_version,
    platform_tokens,
    probe,
)
from gigafactory.schemas.capabilities import matches, parse_offer

posix_only = pytest.mark.skipif(os.name != "posix", reason="fake tools are shell scripts")


def _tool(directory, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _versions(tokens: list[str], key: str) -> list[str]:
    return [t for t in tokens if t.startswith(f"{key}:")]


def test_tokens_are_sorted_unique_and_valid_offers():
    tokens = probe(environ={"PATH": os.environ.get("PATH", "")})
    assert tokens == sorted(set(tokens))
    for t in tokens:
        key, value = parse_offer(t)
        assert t == (key if value is None else f"{key}:{value}")
    assert "engine:shell" in tokens
    here = describe()
    assert f"os:{here['os']}" in tokens and f"arch:{here['arch']}" in tokens
    assert len([t for t in tokens if t.startswith("os:")]) == 1


def test_describe_names_host_os_and_arch():
    d = describe()
    assert set(d) == {"host", "os", "arch"}
    assert d["host"] and d["os"] == normalize_os(sys.platform) and d["arch"] == normalize_arch(platform.machine())
    assert d["os"] in ("linux", "mac", "windows")


@posix_only
def test_fake_tools_on_path_give_has_and_version_tokens(tmp_path):
    _tool(tmp_path, "node", 'echo "v20.11.1"')
    _tool(tmp_path, "git", 'echo "git version 2.43.0"')
    _tool(tmp_path, "go", '[ "$1" = version ] && echo "go version go1.22.1 linux/amd64" || exit 2')
    _tool(tmp_path, "python3", 'echo "Python 3.12.1"')
    _tool(tmp_path, "claude", "exit 0")
    _tool(tmp_path, "xcodebuild", "exit 0")
    tokens = probe(environ={}, path=str(tmp_path), timeout_s=5)
    for expected in (
        "has:node", "node:20.11.1", "has:git", "git:2.43.0", "has:go", "go:1.22.1",
        "has:python3", "python:3.12.1", "has:claude", "has:xcode",
    ):
        assert expected in tokens
    for absent in ("has:codex", "has:aider", "has:docker", "has:xcodebuild", "gpu:nvidia"):
        assert absent not in tokens
    # The router can match real requirements against what the probe offers.
    assert matches(["node>=20", "python>=3.12", "has:git", "go=1.22"], tokens)
    assert not matches(["node>=21"], tokens)


@posix_only
def test_nvidia_smi_listing_gives_gpu_and_count(tmp_path):
    _tool(
        tmp_path,
        "nvidia-smi",
        '[ "$1" = -L ] || exit 9\n'
        'echo "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-1111)"\n'
        'echo "GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-2222)"',
    )
    tokens = probe(environ={}, path=str(tmp_path))
    assert {"has:nvidia-smi", "gpu:nvidia", "gpu-count:2"} <= set(tokens)


@posix_only
def test_nvidia_smi_without_gpus_gives_no_gpu_tokens(tmp_path):
    _tool(tmp_path, "nvidia-smi", 'echo "No devices were found"; exit 6')
    tokens = probe(environ={}, path=str(tmp_path))
    assert "has:nvidia-smi" in tokens
    assert not [t for t in tokens if t.startswith("gpu")]


@posix_only
def test_a_hanging_tool_is_not_versioned_and_is_killed(tmp_path):
    pidfile = tmp_path / "git.pid"
    _tool(tmp_path, "git", f"echo $$ > {pidfile}\nexec /bin/sleep 1000")
    _tool(tmp_path, "node", 'echo "v22.1.0"')
    started = time.monotonic()
    tokens = probe(environ={}, path=str(tmp_path), timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert "has:git" in tokens and _versions(tokens, "git") == []
    assert "node:22.1.0" in tokens  # the other tools are still versioned
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: not even a zombie is left


@posix_only
def test_a_failing_or_garbled_tool_is_not_versioned(tmp_path):
    _tool(tmp_path, "node", 'echo "v20.1.0"; exit 1')
    _tool(tmp_path, "git", 'echo "not a version at all"')
    _tool(tmp_path, "go", "kill -9 $$")
    tokens = probe(environ={}, path=str(tmp_path))
    assert {"has:node", "has:git", "has:go"} <= set(tokens)
    assert _versions(tokens, "node") == [] and _versions(tokens, "git") == [] and _versions(tokens, "go") == []


def test_without_python3_on_path_the_running_interpreter_is_reported(tmp_path):
    tokens = probe(environ={}, path=str(tmp_path))
    assert "has:python3" not in tokens
    assert _versions(tokens, "python") == ["python:{}.{}.{}".format(*sys.version_info[:3])]


def test_credentials_are_reported_by_presence_and_never_by_value(tmp_path):
    secrets = {
        "ANTHROPIC_API_KEY": "sk-ant-SECRET-value-1234567890",
        "OPENAI_API_KEY": "sk-openai-SECRET-0987654321",
        "AWS_ACCESS_KEY_ID": "AKIASECRETSECRET",
    }
    environ = {**secrets, "GH_TOKEN": "", "SOME_OTHER_TOKEN": "ignored-value"}
    tokens = probe(environ=environ, path=str(tmp_path))
    creds = [t for t in tokens if t.startswith("cred:")]
    assert creds == ["cred:anthropic_api_key", "cred:aws_access_key_id", "cred:openai_api_key"]
    dump = repr(tokens).lower()
    for value in (*secrets.values(), "ignored-value"):
        assert value.lower() not in dump
    assert "cred:gh_token" not in tokens  # set but empty is not a credential


def test_extra_tokens_are_normalized_and_merged():
    tokens = probe(["Station:Big", "has:git", "region:eu-west-1", "engine:shell"], environ={}, path="")
    assert "station:big" in tokens and "region:eu-west-1" in tokens
    assert tokens.count("engine:shell") == 1


@pytest.mark.parametrize("bad", ["node>=20", "two words", "", ":nokey", "Has:", 42])
def test_bad_extra_token_raises_value_error_naming_it(bad):
    with pytest.raises(ValueError) as info:
        probe([bad], environ={}, path="")
    assert repr(bad) in str(info.value)


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s"):
        probe(environ={}, path="", timeout_s=0)


@pytest.mark.parametrize(
    ("sys_platform", "expected"),
    [("linux", "linux"), ("linux2", "linux"), ("darwin", "mac"), ("win32", "windows"), ("cygwin", "windows")],
)
def test_normalize_os(sys_platform, expected):
    assert normalize_os(sys_platform) == expected


@pytest.mark.parametrize(
    ("machine", "expected"),
    [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("amd64", "x86_64"), ("aarch64", "arm64"), ("arm64", "arm64"),
     ("ARM64", "arm64"), ("riscv64", "riscv64")],
)
def test_normalize_arch(machine, expected):
    assert normalize_arch(machine) == expected


def test_gpu_apple_only_on_arm64_macs():
    assert "gpu:apple" in platform_tokens("mac", "arm64")
    assert "gpu:apple" not in platform_tokens("mac", "x86_64")
    assert "gpu:apple" not in platform_tokens("linux", "arm64")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v20.11.1\n", "20.11.1"),
        ("git version 2.43.0.windows.1", "2.43.0"),
        ("go version go1.22.1 linux/amd64", "1.22.1"),
        ("Python 3.11.7", "3.11.7"),
        ("no version here", None),
        ("build 7", None),
        ("", None),
    ],
)
def test_parse_tool_version(text, expected):
    assert parse_tool_version(text) == expected


def test_count_nvidia_gpus():
    assert count_nvidia_gpus("GPU 0: Tesla T4 (UUID: x)\nGPU 1: Tesla T4 (UUID: y)\n") == 2
    assert count_nvidia_gpus("NVIDIA-SMI has failed because it couldn't communicate with the driver") == 0
    assert count_nvidia_gpus("") == 0

"""The pure streaming redactor (factory/redact.py): table tests, chunk splits, bounds."""

from __future__ import annotations

import random

import pytest

from gigafactory.factory.redact import Redactor, secret_values

PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx1y2z3+abc/def==\nQWERTYuiopASDFGHjkl\n"
       "-----END RSA PRIVATE KEY-----")
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
TOKENS = [
    ("anthropic", "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWx-yz_0123456789"),
    ("openai", "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxyz0123456789"),
    ("openai", "sk-AbCdEfGhIjKlMnOpQrStUvWxyz0123"),
    ("github", "ghp_" + "a1B2c3D4e5" * 4),
    ("github", "gho_" + "Z9y8X7w6V5" * 4),
    ("github", "ghs_" + "Q1w2E3r4T5" * 4),
    ("github", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
    ("aws", "AKIAIOSFODNN7EXAMPLE"),
    ("google", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
    ("slack", "xoxb-123456789012-1234567890123-AbCdEfGhIjKl"),
    ("jwt", JWT),
    ("private_key", PEM),
]


@pytest.mark.parametrize("name, token", TOKENS)
def test_each_token_shape_is_redacted_by_name_with_noise_around(name, token):
    r = Redactor.build({})
    out = r.text(f"before {token} after\n")
    assert out == f"before [REDACTED:{name}] after\n"


@pytest.mark.parametrize("text", [
    "sk-short", "the sky is blue", "ghp_tooShort", "AKIA1234", "eyJ not a jwt", "-----BEGIN PUBLIC KEY-----",
    "a skeleton key", "task-ant-colony",
])
def test_ordinary_text_is_left_alone(text):
    assert Redactor.build({}).text(text) == text


def test_secret_values_are_named_for_their_variable_and_win_over_their_shape():
    r = Redactor.build({"ANTHROPIC_API_KEY": "sk-ant-api03-AbCdEfGhIjKlMnOpQrSt",
                        "DB_PASSWORD": "correct-horse-battery"})
    assert r.text("k=sk-ant-api03-AbCdEfGhIjKlMnOpQrSt p=correct-horse-battery.") == \
        "k=[REDACTED:ANTHROPIC_API_KEY] p=[REDACTED:DB_PASSWORD]."


def test_secret_values_come_from_secret_names_cred_variables_and_the_url_password():
    env = {"ANTHROPIC_API_KEY": "sk-ant-xxxxxxxxxx", "MY_TOKEN": "tokentokentoken", "HOME": "/home/someone",
           "WEIRD": "notnamedsecret", "SHORT_TOKEN": "abc", "GIGAFACTORY_CREDS": "/etc/gf/f.creds"}
    got = secret_values(env, ["WEIRD"], urls="nats://gf:hunter2pass@h:4222,nats://h2:4222")
    assert got == {"ANTHROPIC_API_KEY": "sk-ant-xxxxxxxxxx", "MY_TOKEN": "tokentokentoken", "WEIRD": "notnamedsecret",
                   "nats_url_password": "hunter2pass"}


def test_values_too_short_to_be_credentials_are_not_redacted():
    r = Redactor.build({"FLAG_TOKEN": "1", "X_SECRET": "true"})
    assert r.text("1 true") == "1 true"


SECRETS = {"ANTHROPIC_API_KEY": "sk-ant-api03-" + "Q" * 40, "NPM_TOKEN": "npm_tok_very_secret_value_" + "z" * 600}


@pytest.mark.parametrize("seed", range(40))
def test_a_stream_cut_anywhere_redacts_like_the_whole(seed):
    rnd = random.Random(seed)
    pieces = ["noise ", SECRETS["ANTHROPIC_API_KEY"], " more ", SECRETS["NPM_TOKEN"], "\n", PEM, " x ", JWT,
              " tail ghp_" + "a1B2c3D4e5" * 4, " end"]
    whole = "".join(rnd.sample(pieces, len(pieces))).encode()
    r = Redactor.build(SECRETS)
    s = r.stream()
    out, i = [], 0
    while i < len(whole):
        n = rnd.choice([1, 2, 3, 7, 50, 400])
        out.append(s.feed(whole[i:i + n]))
        i += n
    out.append(s.flush())
    got = b"".join(out)
    assert got == r.bytes(whole)
    for v in [*SECRETS.values(), PEM, JWT]:
        assert v.encode() not in got and v.encode()[:30] not in got
    assert s.max_carry_bytes <= r.carry_bytes + len(PEM) + len(SECRETS["NPM_TOKEN"])


def test_a_stream_emits_text_without_secrets_promptly_and_keeps_a_bounded_tail():
    r = Redactor.build({"X_TOKEN": "abcdefghij"})
    s = r.stream()
    first = s.feed(b"a" * 2000 + b"abcde")
    assert first and len(first) >= 2000 - r.carry_bytes and b"abcde" not in first[-5:]
    rest = s.feed(b"fghij done") + s.flush()
    assert b"abcdefghij" not in first + rest and (first + rest).endswith(b"[REDACTED:X_TOKEN] done")


def test_json_like_values_are_redacted_inside():
    r = Redactor.build({"X_TOKEN": "abcdefghij"})
    assert r.value({"a": ["x abcdefghij", 3], "abcdefghij": None}) == \
        {"a": ["x [REDACTED:X_TOKEN]", 3], "[REDACTED:X_TOKEN]": None}


def test_complete_lines_go_out_at_once_and_a_pem_block_in_progress_is_held():
    r = Redactor.build({"X_TOKEN": "abcdefghij"})
    s = r.stream()
    assert s.feed(b"hello\nwor") == b"hello\n"
    assert s.feed(b"ld abcde") == b""
    assert s.feed(b"fghij\n") == b"world [REDACTED:X_TOKEN]\n"
    head, body = PEM.split("\n", 1)
    assert s.feed((head + "\n").encode()) == b"", "a private key block in progress is held, lines or not"
    end = body.index("-----END")
    assert s.feed(body[:end].encode()) == b"", "still no END line"
    assert s.feed(body[end:].encode() + b"\nafter\n") == b"[REDACTED:private_key]\nafter\n"
    multi = Redactor.build({"X_PEM": "line-one-secret\nline-two-secret"})
    assert not multi.lines_safe and multi.stream().feed(b"line-one-secret\n") == b""


def test_log_lines_are_redacted_with_their_arguments_traceback_and_json_form():
    import io
    import logging

    from gigafactory.clitools import JsonLogFormatter
    from gigafactory.factory.redact import install_log_redaction

    secret = "a-credential-value-0123456789"
    red = Redactor.build({"GH_TOKEN": secret})
    logger = logging.getLogger("test-redact-logs")
    logger.propagate = False
    text_out, json_out = io.StringIO(), io.StringIO()
    th, jh = logging.StreamHandler(text_out), logging.StreamHandler(json_out)
    jh.setFormatter(JsonLogFormatter())
    logger.addHandler(th)
    logger.addHandler(jh)
    try:
        remove = install_log_redaction(red, logger)
        again = install_log_redaction(red, logger)  # a second factory of the process: one filter
        assert len(th.filters) == 1
        logger.warning("push to %s failed", f"https://x-access-token:{secret}@github.com/o/r")
        try:
            raise RuntimeError(f"fatal: could not read from https://{secret}@host")
        except RuntimeError:
            logger.exception("git said")
        remove()
        assert len(th.filters) == 1, "the other factory still runs"
        again()
        assert not th.filters
        logger.warning("after: %s", secret)  # the factory is gone: nothing to redact for
    finally:
        logger.removeHandler(th)
        logger.removeHandler(jh)
    text, js = text_out.getvalue(), json_out.getvalue()
    before = text[: text.index("after:")]
    assert secret not in before and secret not in js.split("after:")[0]
    assert before.count("[REDACTED:GH_TOKEN]") == 2, before  # the message and the exception line
    assert '"exception"' in js and "[REDACTED:GH_TOKEN]" in js
    assert secret in text[text.index("after:"):], "the control: without the filter it would be there"

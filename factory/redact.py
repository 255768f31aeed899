"""Redaction at the source: secrets never leave the factory (issue 12, "Secrets").

Pure and sans-I/O. Before a log chunk, an event, a reason string or an artifact leaves the
factory (the live log subject, the log file and its copy in ``gf_artifacts``, ``GF_EVENTS``, a
record's reason and detail, the outbox), it goes through a :class:`Redactor`, which replaces

- every value of a credential the factory holds (the values of the secret-named variables of
  its environment: :func:`secret_values`, which include the ``cred:`` variables it resolves for
  jobs, and the password in its broker URL), and
- every string shaped like a well-known token (:data:`TOKEN_PATTERNS`: Anthropic, OpenAI,
  GitHub, AWS access key ids, Google API keys, Slack, NATS nkey seeds, PEM private-key blocks,
  JWTs)

with ``[REDACTED:<name>]`` (the variable's name, or the token kind).

Streams: output arrives in chunks cut anywhere, so a secret may be split across two writes.
:class:`StreamRedactor` keeps back a bounded tail of the raw bytes (``carry_bytes``: the longest
secret or token prefix that could still be completed by the next chunk, and never a complete
line when no secret holds a line break) and emits only what no later byte can change;
:meth:`StreamRedactor.flush` emits the rest at the end. A token shape in progress at the end of
the buffer (a PEM block until its END line, a JWT, a long key) is held back whole, up to its
pattern's bound. The cost: the unfinished last line of a live log lags by at most
``carry_bytes`` (plus a token in progress) until the next write or the end of the run.

What it does not catch: a secret transformed before it is printed (base64, reversed, one
character per line with other text between), a value shorter than :data:`SECRET_MIN_CHARS`,
and a token of a kind not listed here. It is a safety net, not a licence to print secrets.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

SECRET_MIN_CHARS = 8
"""Values shorter than this are not redacted as literals (redacting ``1`` or ``true`` would
destroy every log); a real credential is longer."""
SECRET_MAX_CHARS = 16_384
"""Longer values are not literals to look for (a credentials file is read line by line)."""
SECRETS_MAX = 512
"""At most this many distinct secret values (the rest are dropped, longest kept)."""
PEM_END_MAX_BYTES = 80
"""Longest ``-----END ... PRIVATE KEY-----`` line: a key block without one is held while
this much or less follows it."""
TOKEN_CARRY_BYTES = 512
"""The carry-over kept for token shapes: a token's prefix at least this long already matches
its pattern, so a split one is held back whole."""

SECRET_NAME_RE = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?|_PAT|SEED)",
                            re.IGNORECASE)
"""An environment variable whose name says it holds a secret."""

_B = r"[A-Za-z0-9_\-]"
TOKEN_PATTERNS: tuple[tuple[str, str], ...] = (
    ("anthropic", r"sk-ant-[A-Za-z0-9_\-]{16,400}"),
    ("openai", r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,400}"),
    ("github", r"(?:gh[pousr]_[A-Za-z0-9]{30,255}|github_pat_[A-Za-z0-9_]{30,255})"),
    ("aws", r"(?:AKIA|ASIA)[A-Z0-9]{16}"),
    ("google", r"AIza[A-Za-z0-9_\-]{35}"),
    ("slack", r"xox[abposr]-[A-Za-z0-9\-]{10,250}"),
    ("nkey_seed", r"S[UANOC][A-Z2-7]{54,60}"),
    ("jwt", rf"eyJ{_B}{{8,}}\.(?:{_B}|\.){{0,8192}}"),
    ("private_key", r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----(?:(?!-----END)[A-Za-z0-9+/=\s:,.()\-]){0,16384}"
                    r"(?:-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?"),
)
"""``(name, regular expression)`` of the well-known token shapes. Each is bounded (so a match,
and the carry-over that waits for one, is bounded), and each matches any long enough prefix of
its token (so a token split across chunks is recognised before its end arrives)."""


def secret_values(environ: Mapping[str, str], names: Iterable[str] = (), urls: str = "") -> dict[str, str]:
    """The credential values the factory holds, by name: the variables of ``environ`` named in
    ``names`` (the ``cred:`` variables it resolves for jobs) or whose name says secret
    (:data:`SECRET_NAME_RE`), and the password or token in ``urls`` (its broker URLs).
    Values shorter than :data:`SECRET_MIN_CHARS` or longer than :data:`SECRET_MAX_CHARS` are
    left out.

    :param environ: the factory's environment.
    :param names: further variable names whose values are secrets.
    :param urls: the broker URLs (comma-separated) the factory connects with.
    """
    wanted = set(names)
    out: dict[str, str] = {}
    for k, v in environ.items():
        if (k in wanted or SECRET_NAME_RE.search(k)) and SECRET_MIN_CHARS <= len(v) <= SECRET_MAX_CHARS:
            out[v] = k
    for u in urls.split(","):
        rest = u.strip().partition("://")[2] or u.strip()
        userinfo = rest.split("/", 1)[0].rpartition("@")[0]
        if userinfo:
            secret = unquote(userinfo.partition(":")[2] or userinfo)
            if len(secret) >= SECRET_MIN_CHARS:
                out[secret] = "nats_url_password"
    return {name: value for value, name in out.items()}


@dataclass(frozen=True)
class Redactor:
    """Replaces secrets and token shapes in bytes or text with ``[REDACTED:<name>]``.

    Build it with :meth:`build`; :meth:`bytes` and :meth:`text` redact a whole value,
    :meth:`stream` a sequence of chunks."""

    pattern: re.Pattern[bytes]
    names: tuple[str, ...]
    """The replacement name of each group of ``pattern``, by group number - 1."""
    carry_bytes: int
    """The raw tail a stream keeps back: the longest literal minus one, at least
    :data:`TOKEN_CARRY_BYTES`."""
    lines_safe: bool = True
    """No literal holds a line break, and no token shape but a PEM block spans one: a stream
    may emit every complete line at once (a PEM block in progress is still held whole)."""

    @classmethod
    def build(cls, secrets: Mapping[str, str], *, tokens: bool = True) -> "Redactor":
        """A redactor for ``secrets`` (name -> value) and, with ``tokens``, the token shapes.

        :param secrets: the literal values to redact, by the name that replaces them.
        :param tokens: also redact :data:`TOKEN_PATTERNS`.
        """
        literals = sorted(((n, v.encode("utf-8", "surrogateescape")) for n, v in secrets.items()
                           if SECRET_MIN_CHARS <= len(v) <= SECRET_MAX_CHARS), key=lambda nv: -len(nv[1]))
        literals = literals[:SECRETS_MAX]
        alts, names = [], []
        # Literals first: at one position, the first alternative that matches wins, so a
        # credential the factory holds is named for its variable, not for its shape.
        for name, value in literals:
            alts.append(b"(" + re.escape(value) + b")")
            names.append(name)
        for name, rx in TOKEN_PATTERNS if tokens else ():
            alts.append(b"(" + rx.encode() + b")")
            names.append(name)
        longest = max((len(v) for _, v in literals), default=0)
        pattern = re.compile(b"|".join(alts) if alts else b"(?!)")
        return cls(pattern, tuple(names), max(TOKEN_CARRY_BYTES if tokens else 0, longest - 1),
                   lines_safe=not any(b"\n" in v or b"\r" in v for _, v in literals))

    def _replace(self, m: re.Match[bytes]) -> bytes:
        return b"[REDACTED:" + self.names[m.lastindex - 1].encode() + b"]"  # type: ignore[operator]

    def bytes(self, data: bytes) -> bytes:
        """``data`` with every secret and token replaced.

        :param data: a whole value (a stored file, an artifact)."""
        return self.pattern.sub(self._replace, data)

    def text(self, s: str) -> str:
        """``s`` with every secret and token replaced (a reason, a detail, an event field).

        :param s: the text."""
        if not s:
            return s
        return self.bytes(s.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")

    def value(self, v):
        """``v`` (a JSON-like value: str, list, dict, numbers) with every string redacted.

        :param v: the value; dict keys are redacted too."""
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, dict):
            return {self.text(k) if isinstance(k, str) else k: self.value(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [self.value(x) for x in v]
        return v

    def stream(self) -> "StreamRedactor":
        """A redactor for one stream of chunks (one run's output)."""
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts a stream cut into chunks anywhere: :meth:`feed` returns what is safe to emit,
    :meth:`flush` the rest. The raw tail kept back is at most ``carry_bytes`` plus one match."""

    def __init__(self, redactor: Redactor) -> None:
        self.r = redactor
        self._carry = b""
        self.max_carry_bytes = 0
        """The largest tail held back so far (for tests and the bound)."""

    def feed(self, chunk: bytes) -> bytes:
        """Redact ``chunk`` after what came before; returns the bytes no later chunk can change.

        :param chunk: the next bytes of the stream."""
        buf = self._carry + chunk
        cut = max(0, len(buf) - self.r.carry_bytes)
        if self.r.lines_safe:
            # Complete lines go out at once (a live log shows a line when it is written): no
            # secret or token can run on past a line break, and one in progress is held below.
            cut = max(cut, buf.rfind(b"\n") + 1)
        out, pos = [], 0
        for m in self.r.pattern.finditer(buf):
            if m.start() >= cut:
                break
            if m.end() > cut or m.end() == len(buf) or self._pem_open(m, len(buf)):
                # Straddles the cut, or runs to the end of what we have (a token may go on),
                # or a private key whose END line may be arriving: keep it whole for the next
                # chunk to complete.
                cut = m.start()
                break
            out.append(buf[pos:m.start()])
            out.append(self.r._replace(m))
            pos = m.end()
        out.append(buf[pos:cut])
        self._carry = buf[cut:]
        self.max_carry_bytes = max(self.max_carry_bytes, len(self._carry))
        return b"".join(out)

    def _pem_open(self, m: re.Match[bytes], size: int) -> bool:
        """A private-key match without its END line, close enough to the end of the buffer
        that the END line may be what follows (else the block is cut short: final as it is)."""
        return (self.r.names[m.lastindex - 1] == "private_key"  # type: ignore[operator]
                and b"-----END" not in m.group() and size - m.end() < PEM_END_MAX_BYTES)

    def flush(self) -> bytes:
        """The rest of the stream, redacted; the redactor is empty after."""
        rest, self._carry = self._carry, b""
        return self.r.bytes(rest)


def factory_redactor(environ: Mapping[str, str], *, cred_vars: Iterable[str], extra_vars: Iterable[str] = (),
                     urls: str = "") -> Redactor:
    """The redactor of a factory: the secrets of its environment (:func:`secret_values` with
    the ``cred:`` variables and the operator's ``redact_extra_vars``), its broker URL's
    password, and the token shapes.

    :param environ: the factory's environment.
    :param cred_vars: the credential variables it resolves for jobs (``CREDENTIAL_VARS``).
    :param extra_vars: further names (``redact_extra_vars``).
    :param urls: its broker URLs.
    """
    return Redactor.build(secret_values(environ, [*cred_vars, *extra_vars], urls=urls))


class LogRedactFilter(logging.Filter):
    """Redacts the factory's own log lines (its stderr, or the file ``up`` sends it to): a git
    error naming a remote URL with its token, a connection error with the broker password, an
    exception whose message carries a job's output. Installed on the root logger's handlers
    while the factory runs (:func:`install_log_redaction`); the message, its traceback and its
    stack are rendered and redacted before any formatter sees them.

    :param redactor: the factory's :class:`Redactor`."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string: logging reports it; nothing of ours to redact
            return True
        record.msg, record.args = self.redactor.text(msg), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.text(record.stack_info)
        return True


_LOG_FILTERS: dict[tuple[int, bytes], list] = {}
"""(logger id, redaction pattern) -> [filter, users]: the factories of one process (a fleet
host runs many) that share their secrets share one filter, so a log line is redacted once, not
once per factory."""


def install_log_redaction(redactor: Redactor, logger: logging.Logger | None = None):
    """Put a :class:`LogRedactFilter` on every handler of ``logger`` (the root logger: where
    every ``gigafactory`` line ends), and return the function that takes it off again (a
    factory's run ends; a test process runs many factories). Factories of one process with the
    same secrets share one filter.

    :param redactor: the factory's :class:`Redactor`.
    :param logger: whose handlers; the root logger by default."""
    logger = logger or logging.getLogger()
    key = (id(logger), redactor.pattern.pattern)
    entry = _LOG_FILTERS.get(key)
    if entry is None:
        flt = LogRedactFilter(redactor)
        handlers = list(logger.handlers)
        for h in handlers:
            h.addFilter(flt)
        entry = _LOG_FILTERS[key] = [flt, 0, handlers]
    entry[1] += 1
    done = False

    def remove() -> None:
        nonlocal done
        if done:
            return
        done = True
        entry[1] -= 1
        if entry[1] == 0:
            _LOG_FILTERS.pop(key, None)
            for h in entry[2]:
                h.removeFilter(entry[0])

    return remove

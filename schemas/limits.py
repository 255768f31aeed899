"""The limits intake enforces on what users submit, as plain values (no I/O).

Every input has a size limit, and every refusal names the limit, its setting and the
environment variable that changes it, so a user can tell "my file is wrong" from "this
fleet is configured small". The values come from :class:`gigafactory.config.Settings`
(``Limits.from_settings``); the defaults here are the same numbers, for pure callers
(parsing a file in a test or an editor) that have no settings.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MAX_JOB_FILE_BYTES = 512 * 1024
MAX_MANIFEST_BYTES = 64 * 1024
MAX_MANIFEST_DEPTH = 16
MAX_BODY_BYTES = 384 * 1024
MAX_DEPS = 1000
MAX_KEY_CHARS = 256
MAX_REASON_CHARS = 2000
MAX_BATCH_FILES = 1000
MAX_BATCH_BYTES = 16 * 1024 * 1024
RECORD_HEADROOM_BYTES = 64 * 1024

DEPTH_CEILING = 200
"""No setting may raise ``max_manifest_depth`` past this: the YAML composer and the checks
after it recurse once per level, and Python's own recursion limit is 1,000 frames."""


def hint(name: str, value: int) -> str:
    """How a refusal names a limit: ``(limit max_deps = 1000, GIGAFACTORY_MAX_DEPS)``."""
    return f"(limit {name} = {value:,}, set by GIGAFACTORY_{name.upper()})"


@dataclass(frozen=True, slots=True)
class Limits:
    """Ceilings on one submission. Each field is the :class:`~gigafactory.config.Settings`
    field of the same name; see there for what each one risks."""

    max_job_file_bytes: int = MAX_JOB_FILE_BYTES
    """A whole job file, UTF-8 bytes."""
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    """The front matter, UTF-8 bytes; also its size with every YAML alias written out."""
    max_manifest_depth: int = MAX_MANIFEST_DEPTH
    """Nesting levels of the front matter (the manifest itself is 3 deep at most)."""
    max_body_bytes: int = MAX_BODY_BYTES
    """The prompt or script after the front matter, UTF-8 bytes."""
    max_deps: int = MAX_DEPS
    """Entries of ``deps``."""
    max_key_chars: int = MAX_KEY_CHARS
    """``idempotency-key``, ``lock`` and each ``deps`` entry, characters."""
    max_reason_chars: int = MAX_REASON_CHARS
    """A reason stored on a job record (an operator's cancel reason, "waiting for ...")."""
    max_batch_files: int = MAX_BATCH_FILES
    """Files in one submission (one API call, one inbox batch)."""
    max_batch_bytes: int = MAX_BATCH_BYTES
    """Bytes the inbox reads for one batch; the files after that wait for the next scan."""
    record_headroom_bytes: int = RECORD_HEADROOM_BYTES
    """Room kept free in a job record at intake for what the protocol adds later (lease,
    attempts, results, reasons): a record is refused if it would leave less than this under
    the broker's max payload."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} = {value!r}: expected a whole number, 1 or more "
                                 f"(GIGAFACTORY_{f.name.upper()})")
        if self.max_manifest_depth > DEPTH_CEILING:
            raise ValueError(f"max_manifest_depth = {self.max_manifest_depth}: at most {DEPTH_CEILING}, or parsing a "
                             "deep manifest could exhaust Python's recursion limit (GIGAFACTORY_MAX_MANIFEST_DEPTH)")
        if self.record_headroom_bytes < 4 * self.max_reason_chars:
            raise ValueError(f"record_headroom_bytes = {self.record_headroom_bytes} must be at least 4 x "
                             f"max_reason_chars ({4 * self.max_reason_chars}): a stored reason (4 bytes a "
                             "character at most) must fit in the room kept for it")

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        """The limits of a :class:`~gigafactory.config.Settings` (anything with these fields)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def refusal(self, name: str, what: str, size: int, unit: str, fix: str) -> str:
        """The message for ``what`` being ``size`` ``unit`` over the limit ``name``."""
        limit = getattr(self, name)
        return f"{what} is {size:,} {unit}, more than {limit:,} {hint(name, limit)}; {fix}"


def clip_reason(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters, saying how much was cut (for reasons built
    from lists, like "waiting for a, b, c, ...": the record keeps a bounded summary)."""
    if len(text) <= max_chars:
        return text
    tail = f" ... (cut from {len(text):,} characters)"
    return text[: max(0, max_chars - len(tail))] + tail

"""The text of a job's pull request: what ran, what it cost, what verify said. Pure: values
in, markdown out (no I/O), so every forge says the same and a test reads it exactly.

:func:`run_facts` gathers the values from a job record; :func:`pull_request_body` and
:func:`pull_request_title` write them. Everything a job's agent or its commands produced
(verify's output, the prompt's first line) is bounded and quoted so that it cannot break
the page: verify's output sits in a code fence longer than any run of backticks in it.
"""

from __future__ import annotations

import re

import msgspec

BODY_MAX_CHARS = 60_000
"""Longest body written (GitHub refuses more than 65,536 characters)."""
TITLE_MAX_CHARS = 120
"""Longest title written."""
VERIFY_TAIL_LINES = 40
"""Lines of verify's output quoted (its end: where test runners put the summary)."""
VERIFY_TAIL_CHARS = 4000
"""Characters of verify's output quoted, at most."""


class RunFacts(msgspec.Struct, omit_defaults=True):
    """What a pull request says about the run that made it. Unknown values are None and are
    written as "unknown", never as a made-up zero."""

    job: str
    attempts: int
    """Attempts the job took, this one included."""
    branch: str = ""
    base: str = ""
    epoch: int | None = None
    profile: str | None = None
    engine: str | None = None
    model: str | None = None
    factory: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    tokens_cached: int | None = None
    cost_usd: float | None = None
    cost_source: str = "unknown"
    """``reported``, ``priced``, ``estimated`` or ``unknown`` (see the usage record)."""
    verify: str | None = None
    """The verify command, or None when the job has none."""
    verify_exit_code: int | None = None
    verify_output: str = ""
    files_changed: int | None = None
    lines_added: int | None = None
    lines_deleted: int | None = None
    scope_detail: str = ""
    """The scope verdict's detail when something was outside the scope (``warn``)."""


def run_facts(job, *, branch: str = "", base: str = "", verify_output: str = "", **overrides) -> RunFacts:
    """The facts of ``job`` (a :class:`~gigafactory.schemas.records.JobRecord`) after its
    latest attempt: engine and model as that attempt ran them, usage and cost summed over every
    attempt (cost None if an attempt's is unknown), verify's exit code.

    :param job: the job record.
    :param branch: the pushed branch; :param base: the branch it targets.
    :param verify_output: verify's output (its tail is quoted).
    :param overrides: any :class:`RunFacts` field, winning over what the record says.
    """
    m = job.manifest
    last = job.attempts[-1] if job.attempts else None
    usage = last.usage if last is not None else None
    engine = getattr(last, "engine", None) or m.engine
    model = (usage.model if usage and usage.model else None) or m.model
    tin = tout = tcached = None
    cost: float | None = 0.0
    sources: set[str] = set()
    for a in job.attempts:
        u = a.usage
        if u is None:
            continue
        for name, v in (("tin", u.input_tokens), ("tout", u.output_tokens), ("tcached", u.cache_read_tokens)):
            if v is not None:
                if name == "tin":
                    tin = (tin or 0) + v
                elif name == "tout":
                    tout = (tout or 0) + v
                else:
                    tcached = (tcached or 0) + v
        sources.add(u.cost_source)
        cost = None if cost is None or u.cost_usd is None else cost + u.cost_usd
    if not sources:
        cost = None
    source = "unknown" if cost is None else ("reported" if sources == {"reported"} else
                                             "priced" if sources <= {"reported", "priced"} else "estimated")
    facts = RunFacts(
        job=job.id, attempts=max(job.attempt, len(job.attempts)), branch=branch, base=base, epoch=job.epoch,
        profile=job.profile.name if job.profile else m.profile, engine=engine, model=model,
        factory=last.factory if last is not None else None,
        tokens_in=tin, tokens_out=tout, tokens_cached=tcached, cost_usd=cost, cost_source=source,
        verify=m.verify, verify_exit_code=last.verify_exit_code if last is not None else None,
        verify_output=verify_output)
    return msgspec.structs.replace(facts, **overrides) if overrides else facts


def _cell(v: object) -> str:
    """A table cell: unknown for None; pipes escaped, one line, bounded."""
    if v is None or v == "":
        return "unknown"
    text = re.sub(r"\s+", " ", str(v)).replace("|", "\\|")
    return text[:200]


def _code(v: object, in_table: bool = True) -> str:
    """``v`` as an inline code span that survives backticks inside it (and, in a table cell,
    pipes: GitHub's tables split on a ``|`` even inside code)."""
    text = re.sub(r"\s+", " ", str(v))[:500]
    ticks = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    span = f"{ticks}{pad}{text}{pad}{ticks}"
    return span.replace("|", "\\|") if in_table else span


def _tail(text: str) -> tuple[str, bool]:
    lines = text.rstrip("\n").splitlines()
    cut = len(lines) > VERIFY_TAIL_LINES
    tail = "\n".join(lines[-VERIFY_TAIL_LINES:])
    if len(tail) > VERIFY_TAIL_CHARS:
        tail, cut = tail[-VERIFY_TAIL_CHARS:], True
    return tail, cut


def _count(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def pull_request_title(job: str, prompt: str) -> str:
    """``<first line of the prompt> (gigafactory <job>)``, one line, at most
    ``TITLE_MAX_CHARS``; the job id alone names it when the prompt has no text."""
    first = next((ln.strip().lstrip("#").strip() for ln in prompt.splitlines() if ln.strip()), "")
    suffix = f" (gigafactory {job})"
    room = TITLE_MAX_CHARS - len(suffix)
    if not first:
        return f"gigafactory {job}"[:TITLE_MAX_CHARS]
    if len(first) > room:
        first = first[:room - 1].rstrip() + "…"
    return first + suffix


def pull_request_body(f: RunFacts) -> str:
    """The markdown body of the pull request for the run ``f`` describes: a table of what ran
    (job, profile, engine, model, factory, attempts, tokens, cost and its source, changes),
    verify's command, result and the tail of its output, and the command that shows the logs.
    At most ``BODY_MAX_CHARS``."""
    cost = "unknown" if f.cost_usd is None else f"${f.cost_usd:.4f} ({f.cost_source})"
    tokens = f"{_count(f.tokens_in)} in, {_count(f.tokens_out)} out"
    if f.tokens_cached:
        tokens += f", {_count(f.tokens_cached)} cached"
    rows = [
        ("Job", _code(f.job)),
        ("Profile", _cell(f.profile) if f.profile else "none"),
        ("Engine", _cell(f.engine)),
        ("Model", _cell(f.model)),
        ("Attempts", str(f.attempts) + (f" (epoch {f.epoch})" if f.epoch is not None else "")),
        ("Tokens", tokens),
        ("Cost", cost),
    ]
    if f.factory:
        rows.append(("Factory", _cell(f.factory)))
    if f.branch:
        rows.append(("Branch", _code(f.branch) + (f" → {_code(f.base)}" if f.base else "")))
    if f.files_changed is not None:
        rows.append(("Changes", f"{f.files_changed} files, +{_count(f.lines_added)} −{_count(f.lines_deleted)}"))
    out = ["This pull request was made by Gigafactory.", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "### Verify", ""]
    if f.verify is None:
        out.append("The job has no `verify` command: nothing checked this change before it was pushed.")
    else:
        result = ("not run" if f.verify_exit_code is None else
                  "passed" if f.verify_exit_code == 0 else f"failed (exit {f.verify_exit_code})")
        out.append(f"{_code(f.verify, in_table=False)}: **{result}**")
        if f.verify_output.strip():
            tail, cut = _tail(f.verify_output)
            fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", tail)), default=0) + 1)
            out += ["", "The end of its output:" if cut else "Its output:", "",
                    f"{fence}text", tail, fence]
    if f.scope_detail:
        out += ["", "### Scope", "", _cell(f.scope_detail)]
    out += ["", "### Logs", "", "```sh", f"gigafactory logs {f.job}", "```", ""]
    body = "\n".join(out)
    if len(body) > BODY_MAX_CHARS:
        body = body[:BODY_MAX_CHARS - 80] + "\n\n(cut at the pull request body limit)\n"
    return body

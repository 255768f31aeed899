"""The pull request's text (gigafactory/forges/body.py): pure, so read exactly."""

from __future__ import annotations

from gigafactory.forges.body import (
    TITLE_MAX_CHARS,
    VERIFY_TAIL_LINES,
    RunFacts,
    pull_request_body,
    pull_request_title,
    run_facts,
)
from gigafactory.schemas.manifest import Manifest
from gigafactory.schemas.profiles import ProfileSnapshot
from gigafactory.schemas.records import AttemptRecord, JobRecord, Usage


def _job(**kw) -> JobRecord:
    attempts = [
        AttemptRecord(attempt=1, epoch=1, factory="f1", station=0, outcome="failed",
                      usage=Usage(model="claude-sonnet-4", input_tokens=1000, output_tokens=200,
                                  cost_usd=0.01, cost_source="reported")),
        AttemptRecord(attempt=2, epoch=2, factory="f2", station=1, outcome="passed", verify_exit_code=0,
                      usage=Usage(model="claude-sonnet-4", input_tokens=3000, output_tokens=500,
                                  cache_read_tokens=700, cost_usd=0.03, cost_source="priced")),
    ]
    return JobRecord(id="fix-login", manifest=Manifest(cwd=".", engine="claude", verify="pytest -q"),
                     body="# Fix the login bug\n\nDetails.", source="jobs/fix-login.md", content_hash="h",
                     submitted_at=0.0, pool="p", requirements=[], epoch=2, attempt=2, attempts=attempts,
                     profile=ProfileSnapshot(name="backend", content_hash="p"), **kw)


def test_the_body_says_what_ran_what_it_cost_what_verify_said_and_how_to_read_the_logs():
    facts = run_facts(_job(), branch="gf/fix-login/e2", base="main",
                      verify_output="collected 3 items\n...\n3 passed in 0.1s\n")
    assert facts == RunFacts(job="fix-login", attempts=2, branch="gf/fix-login/e2", base="main", epoch=2,
                             profile="backend", engine="claude", model="claude-sonnet-4", factory="f2",
                             tokens_in=4000, tokens_out=700, tokens_cached=700, cost_usd=0.04,
                             cost_source="priced", verify="pytest -q", verify_exit_code=0,
                             verify_output="collected 3 items\n...\n3 passed in 0.1s\n")
    body = pull_request_body(facts)
    assert body == """This pull request was made by Gigafactory.

| | |
|---|---|
| Job | `fix-login` |
| Profile | backend |
| Engine | claude |
| Model | claude-sonnet-4 |
| Attempts | 2 (epoch 2) |
| Tokens | 4,000 in, 700 out, 700 cached |
| Cost | $0.0400 (priced) |
| Factory | f2 |
| Branch | `gf/fix-login/e2` → `main` |

### Verify

`pytest -q`: **passed**

Its output:

```text
collected 3 items
...
3 passed in 0.1s
```

### Logs

```sh
gigafactory logs fix-login
```
"""


def test_unknown_usage_is_written_unknown_never_zero():
    job = _job()
    job.attempts[0].usage = Usage(input_tokens=5, cost_source="unknown")  # cost_usd None
    facts = run_facts(job)
    assert facts.cost_usd is None and facts.cost_source == "unknown"
    body = pull_request_body(RunFacts(job="j", attempts=1))
    assert "| Engine | unknown |" in body and "| Cost | unknown |" in body
    assert "| Tokens | unknown in, unknown out |" in body and "| Profile | none |" in body
    assert "The job has no `verify` command" in body


def test_verify_output_is_quoted_safely_and_only_its_end():
    lines = [f"line {i}" for i in range(VERIFY_TAIL_LINES + 10)] + ["```", "| not a table |", "FAILED x ```` y"]
    facts = RunFacts(job="j", attempts=1, verify="make test | tee log", verify_exit_code=2,
                     verify_output="\n".join(lines), engine="a|b", scope_detail="1 path outside the scope (src/**): x")
    body = pull_request_body(facts)
    assert "`make test | tee log`: **failed (exit 2)**" in body
    assert "The end of its output:" in body and "line 0\n" not in body and "FAILED x ```` y" in body
    assert "\n`````text\n" in body  # a fence longer than the longest run of backticks inside
    assert "| Engine | a\\|b |" in body
    assert "### Scope\n\n1 path outside the scope (src/**): x\n" in body


def test_the_title_is_the_prompts_first_line_and_the_job_bounded():
    assert pull_request_title("fix-login", "\n# Fix the login bug\nmore") == "Fix the login bug (gigafactory fix-login)"
    assert pull_request_title("j", "   \n") == "gigafactory j"
    long = pull_request_title("j", "x" * 500)
    assert len(long) == TITLE_MAX_CHARS and long.endswith("… (gigafactory j)")

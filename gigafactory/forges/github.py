"""The GitHub forge: pull requests, checks and merges through GitHub's REST API (v3).

Endpoints used (shapes from GitHub's published REST description, ``api.github.com``,
version ``2022-11-28``):

- ``GET /repos/{owner}/{repo}/pulls?head=OWNER:BRANCH&base=BASE&state=open``: an open pull
  request for the head already (opening is idempotent).
- ``POST /repos/{owner}/{repo}/pulls`` ``{title, head, base, body}``: 201 with the pull
  request; 422 ``Validation Failed`` when one exists already (then the GET above answers) or
  there is nothing to merge.
- ``GET /repos/{owner}/{repo}/pulls/{n}``: its state, head commit, ``mergeable`` (null while
  GitHub computes it) and ``mergeable_state`` (``clean``, ``dirty``, ``blocked``, ``behind``,
  ``unstable``, ``has_hooks``, ``draft``, ``unknown``).
- ``GET /repos/{owner}/{repo}/commits/{sha}/check-runs`` and ``.../commits/{sha}/status``:
  check runs (``status``, ``conclusion``) and the combined commit status (``state``).
- ``PUT /repos/{owner}/{repo}/pulls/{n}/merge`` ``{sha, merge_method, commit_title}``: 200
  ``{sha, merged, message}``; 405 not mergeable (branch protection, conflicts); 409 the head
  moved (``sha`` no longer matches); 422 base modified meanwhile.

Branch protection is never bypassed: :meth:`GitHubForge.merge` merges only when GitHub says
the pull request is ``clean`` (or ``has_hooks``) AND every check on the head commit passed,
so an administrator's token (which GitHub would let merge past protection) merges nothing a
human could not. The merge pins the head commit (``sha``), so a head that moved is a 409,
not a merge of commits nobody checked.

Only the standard library (``urllib``): every request bounded by ``http_timeout_s``, every
response by ``MAX_RESPONSE_BYTES``; redirects are refused (urllib would resend the token to
wherever they point); the token is sent only to ``api_url`` (https, or http on a loopback
address for tests) and never appears in a message, a log line or a repr.

Tested against a loopback server implementing these endpoints
(:mod:`gigafactory.github_server`); it has not been run against github.com from CI.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from gigafactory.forges.base import (
    BRANCHES_LISTED_MAX,
    ChecksState,
    ForgeAuthError,
    ForgeContext,
    ForgeError,
    ForgeNotFound,
    MergeResult,
    PullRequest,
)

log = logging.getLogger(__name__)

KIND = "github"
API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
"""Longest response body read (a page of 100 check runs is well under 1 MiB)."""
MAX_BODY_CHARS = 65536
"""GitHub's limit on a pull request body; a longer one is cut (with a note) before sending."""
CHECK_PAGES_MAX = 10
"""Pages of 100 check runs read per commit (1,000 checks); more is an error, not a guess."""
MERGEABLE_POLLS = 10
"""How many times :meth:`GitHubForge.merge` re-reads a pull request whose ``mergeable`` is
still being computed (null), ``mergeable_poll_s`` apart, before answering ``blocked``."""
MERGE_TRIES = 3
"""PUT merge attempts when GitHub answers 422 "Base branch was modified" (a race it asks
clients to retry)."""
ERROR_TEXT_CHARS = 500
"""How much of an error response a message quotes."""

_REMOTE_RE = re.compile(
    r"^(?:https?://(?:[^@/]+@)?(?:www\.)?github\.com/|ssh://git@github\.com(?::\d+)?/|git@github\.com:)"
    r"(?P<owner>[A-Za-z0-9](?:[A-Za-z0-9-]{0,38}))/(?P<repo>[A-Za-z0-9._-]{1,100}?)(?:\.git)?/?$")
_ANY_REMOTE_RE = re.compile(
    r"^(?:[a-z+]+://(?:[^@/]+@)?[^/]+/|[^@/:]+@[^:/]+:)(?:.*/)?(?P<owner>[^/]+)/(?P<repo>[^/]+?)(?:\.git)?/?$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_FAILED = ("failure", "cancelled", "timed_out", "action_required", "stale", "startup_failure")
"""Check run conclusions that fail a pull request (``success``, ``neutral`` and ``skipped``
pass)."""


def parse_remote(remote: str) -> tuple[str, str] | None:
    """``(owner, repo)`` of a github.com remote (``https://github.com/o/r(.git)``,
    ``git@github.com:o/r.git``, ``ssh://git@github.com/o/r.git``), else None."""
    m = _REMOTE_RE.match(remote.strip())
    return (m["owner"], m["repo"]) if m else None


def detect(remote: str) -> bool:
    return parse_remote(remote) is not None


def make(remote: str, ctx: ForgeContext) -> "GitHubForge":
    """A forge for ``remote``: a github.com URL, or (the forge named ``github`` explicitly) any
    ``host/owner/repo`` URL of a GitHub Enterprise server whose API is ``ctx.github_api_url``."""
    parsed = parse_remote(remote)
    if parsed is None:
        m = _ANY_REMOTE_RE.match(remote.strip())
        if not m:
            raise ForgeError(f"GitHub forge: cannot read owner/repo from the repository {remote!r}")
        parsed = (m["owner"], m["repo"])
    if not ctx.github_token:
        raise ForgeAuthError(f"GitHub forge for {remote}: no token. Give the job cred:github_token (the factory "
                             f"needs GITHUB_TOKEN or GH_TOKEN set) to open or merge pull requests")
    return GitHubForge(ctx.github_api_url, ctx.github_token, parsed[0], parsed[1], ctx.http_timeout_s)


def check_api_url(api_url: str) -> str:
    """``api_url`` without a trailing ``/`` if it is https, or http on a loopback address;
    ForgeError otherwise (a token must not travel in clear text)."""
    u = urllib.parse.urlsplit(api_url)
    if u.scheme == "https" and u.hostname:
        return api_url.rstrip("/")
    if u.scheme == "http" and u.hostname in _LOOPBACK:
        return api_url.rstrip("/")
    raise ForgeError(f"GitHub API URL {api_url!r} must be https:// (http:// only on a loopback address, "
                     f"for tests): the token is sent with every request")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib's signature
        return None  # urllib then raises HTTPError with the 3xx: answered below, token not resent


def summarise_checks(check_runs: list[Mapping[str, Any]], combined: Mapping[str, Any] | None) -> ChecksState:
    """One state from a commit's check runs and its combined status (pure).

    ``failure`` if a check run concluded in failure (``failure``, ``cancelled``,
    ``timed_out``, ``action_required``, ``stale``) or the combined status is ``failure`` or
    ``error``; else ``pending`` if a check run is not ``completed`` or the combined status is
    ``pending`` with at least one status (GitHub reports ``pending`` for none at all); else
    ``success`` if anything reported; else ``none``."""
    states: set[str] = set()
    for run in check_runs:
        if run.get("status") != "completed":
            states.add("pending")
        elif run.get("conclusion") in _FAILED:
            states.add("failure")
        else:
            states.add("success")
    if combined:
        total = combined.get("total_count") or len(combined.get("statuses") or ())
        st = combined.get("state")
        if st in ("failure", "error"):
            states.add("failure")
        elif total and st == "pending":
            states.add("pending")
        elif total and st == "success":
            states.add("success")
    for s in ("failure", "pending", "success"):
        if s in states:
            return s  # type: ignore[return-value]
    return "none"


class GitHubForge:
    """Pull requests of one GitHub repository.

    :param api_url: the API root (``https://api.github.com``; an Enterprise server's
        ``https://HOST/api/v3``).
    :param token: a token allowed to read and write the repository's pull requests (and
        contents, to merge). Sent only to ``api_url``; never logged.
    :param owner: the repository's owner (user or organisation).
    :param repo: the repository's name.
    :param http_timeout_s: the bound on every request (connect and each read).
    :param mergeable_poll_s: the pause between reads while GitHub computes mergeability.
    """

    kind = KIND

    def __init__(self, api_url: str, token: str, owner: str, repo: str, http_timeout_s: float = 30.0,
                 *, mergeable_poll_s: float = 1.0) -> None:
        if not token:
            raise ForgeAuthError("GitHub forge: an empty token")
        for what, v in (("owner", owner), ("repo", repo)):
            if not _NAME_RE.match(v or ""):
                raise ForgeError(f"GitHub forge: {what} {v!r} is not a GitHub name")
        if not http_timeout_s > 0:
            raise ForgeError(f"GitHub forge: http_timeout_s must be positive, not {http_timeout_s!r}")
        self.api_url = check_api_url(api_url)
        self.owner, self.repo = owner, repo
        self.http_timeout_s = http_timeout_s
        self.mergeable_poll_s = mergeable_poll_s
        self.__token = token
        host = urllib.parse.urlsplit(self.api_url).hostname
        handlers: list[Any] = [_NoRedirect()]
        if host in _LOOPBACK:
            handlers.append(urllib.request.ProxyHandler({}))  # a proxy must not see loopback traffic
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"GitHubForge({self.api_url!r}, token=***, owner={self.owner!r}, repo={self.repo!r})"

    @property
    def _base(self) -> str:
        return f"/repos/{urllib.parse.quote(self.owner)}/{urllib.parse.quote(self.repo)}"

    # -- HTTP ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None,
                 query: Mapping[str, Any] | None = None) -> tuple[int, Any, Mapping[str, str]]:
        """One blocking request: (status, decoded JSON or None, response headers). HTTP error
        statuses are returned, not raised; transport failures raise ForgeError."""
        url = self.api_url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": "gigafactory",
            "Authorization": f"Bearer {self.__token}",
            **({"Content-Type": "application/json"} if data is not None else {}),
        })
        try:
            resp = self._opener.open(req, timeout=self.http_timeout_s)
        except urllib.error.HTTPError as e:
            resp = e
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise ForgeError(f"GitHub {method} {path}: no answer from {self.api_url} ({reason}) "
                             f"within {self.http_timeout_s:g}s") from None
        with resp:
            status = resp.status if hasattr(resp, "status") else resp.code
            try:
                raw = resp.read(MAX_RESPONSE_BYTES + 1)
            except (OSError, TimeoutError) as e:
                raise ForgeError(f"GitHub {method} {path}: the response broke off ({e})") from None
            # Lower-cased: HTTP header names are case-insensitive, and servers differ.
            headers = {k.lower(): v for k, v in resp.headers.items()} if resp.headers else {}
        log.debug("github %s %s -> %s (%d bytes)", method, path, status, len(raw))
        if len(raw) > MAX_RESPONSE_BYTES:
            raise ForgeError(f"GitHub {method} {path}: response larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            payload = json.loads(raw) if raw.strip() else None
        except ValueError:
            payload = {"message": raw[:ERROR_TEXT_CHARS].decode(errors="replace")}
        return status, payload, headers

    async def _call(self, method: str, path: str, body: Any = None,
                    query: Mapping[str, Any] | None = None) -> tuple[int, Any, Mapping[str, str]]:
        # urllib's timeout bounds each socket operation; this bounds the whole request (a
        # server dripping bytes). The thread itself ends at its next socket timeout.
        bound_s = self.http_timeout_s * 2 + 1
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._request, method, path, body, query), timeout=bound_s)
        except asyncio.TimeoutError:
            raise ForgeError(f"GitHub {method} {path}: no complete answer from {self.api_url} "
                             f"within {bound_s:g}s") from None

    def _fail(self, method: str, path: str, status: int, payload: Any, headers: Mapping[str, str]) -> ForgeError:
        """The exception for an unexpected answer, in GitHub's words, with what to check."""
        msg = _message(payload, errors=True)
        what = f"GitHub {method} {self.owner}/{self.repo}{path[len(self._base):]}: {status} {msg}"
        if 300 <= status < 400:
            return ForgeError(f"{what}: redirected to {headers.get('location', '?')} (repository renamed or "
                              f"moved? point the job's repo at its new address)")
        if status == 401:
            return ForgeAuthError(f"{what}: the token was refused; check the factory's GITHUB_TOKEN/GH_TOKEN")
        if status == 429 or (status == 403 and headers.get("x-ratelimit-remaining") == "0"):
            reset = headers.get("x-ratelimit-reset", "")
            return ForgeError(f"{what}: rate limited" + (f" until {reset} (unix time)" if reset else ""))
        if status == 403:
            return ForgeAuthError(f"{what}: the token lacks permission on {self.owner}/{self.repo} "
                                  "(pull requests: write, contents: write)")
        if status == 404:
            return ForgeNotFound(f"{what}: the repository or pull request does not exist, or the token "
                                 "cannot see it")
        return ForgeError(what)

    # -- the forge ------------------------------------------------------------------------------

    def _pull(self, data: Mapping[str, Any], repo: str) -> PullRequest:
        try:
            state = "merged" if data.get("merged") or data.get("merged_at") else data["state"]
            return PullRequest(
                number=int(data["number"]), repo=repo, head=data["head"]["ref"], base=data["base"]["ref"],
                title=data.get("title") or "", body=data.get("body") or "",
                state="open" if state == "open" else "merged" if state == "merged" else "closed",
                head_sha=data["head"].get("sha") or "", url=data.get("html_url") or "",
                merge_sha=data.get("merge_commit_sha") if state == "merged" else None,
                created_at=_ts(data.get("created_at")), updated_at=_ts(data.get("updated_at")))
        except (KeyError, TypeError, ValueError) as e:
            raise ForgeError(f"GitHub {self.owner}/{self.repo}: a pull request without {e} in GitHub's answer") from None

    async def find_open(self, repo: str, head: str, base: str | None = None) -> PullRequest | None:
        """The open pull request from branch ``head`` (of this repository), or None."""
        query = {"head": f"{self.owner}:{head}", "state": "open", "per_page": 10}
        if base:
            query["base"] = base
        path = f"{self._base}/pulls"
        status, data, headers = await self._call("GET", path, query=query)
        if status != 200 or not isinstance(data, list):
            raise self._fail("GET", path, status, data, headers)
        return self._pull(data[0], repo) if data else None

    async def open_pull_request(self, repo: str, head: str, base: str, title: str, body: str) -> PullRequest:
        """Open a pull request from ``head`` into ``base``, or return the open one for ``head``.

        :param repo: the job's ``repo`` as written (kept in the result).
        :param head: a branch of this repository (``gf/<job>/e<epoch>``).
        :param base: the branch to merge into.
        :param title: one line.
        :param body: markdown; cut at GitHub's 65,536 characters (with a note).
        :raises ForgeError: GitHub refused (422 with its validation messages, e.g. "No
            commits between main and gf/x/e1"), or did not answer.
        """
        found = await self.find_open(repo, head, base)
        if found is not None:
            return found
        if len(body) > MAX_BODY_CHARS:
            body = body[:MAX_BODY_CHARS - 100] + "\n\n(cut: longer than GitHub's limit on a pull request body)\n"
        path = f"{self._base}/pulls"
        status, data, headers = await self._call(
            "POST", path, body={"title": title, "head": head, "base": base, "body": body,
                                "maintainer_can_modify": False})
        if status == 201 and isinstance(data, dict):
            return self._pull(data, repo)
        if status == 422 and "already exists" in _message(data, errors=True):
            # Opened by someone else between our GET and POST: that one is ours too.
            found = await self.find_open(repo, head, base)
            if found is not None:
                return found
        raise self._fail("POST", path, status, data, headers)

    async def _get_pull(self, pr: PullRequest) -> dict:
        path = f"{self._base}/pulls/{int(pr.number)}"
        status, data, headers = await self._call("GET", path)
        if status != 200 or not isinstance(data, dict):
            raise self._fail("GET", path, status, data, headers)
        return data

    async def _checks_of(self, sha: str) -> ChecksState:
        runs: list[dict] = []
        path = f"{self._base}/commits/{urllib.parse.quote(sha)}/check-runs"
        for page in range(1, CHECK_PAGES_MAX + 1):
            status, data, headers = await self._call("GET", path, query={"per_page": 100, "page": page})
            if status != 200 or not isinstance(data, dict):
                raise self._fail("GET", path, status, data, headers)
            batch = data.get("check_runs") or []
            runs.extend(batch)
            if not batch or len(runs) >= int(data.get("total_count") or 0):
                break
        else:
            raise ForgeError(f"GitHub {self.owner}/{self.repo}: more than {CHECK_PAGES_MAX * 100} check runs on "
                             f"{sha[:12]}; refusing to judge them from a part")
        spath = f"{self._base}/commits/{urllib.parse.quote(sha)}/status"
        status, combined, headers = await self._call("GET", spath)
        if status != 200 or not isinstance(combined, dict):
            raise self._fail("GET", spath, status, combined, headers)
        return summarise_checks(runs, combined)

    async def checks(self, pr: PullRequest) -> ChecksState:
        """The checks of ``pr``'s head commit as GitHub has it now (check runs and statuses)."""
        data = await self._get_pull(pr)
        return await self._checks_of(data["head"]["sha"])

    async def merge(self, pr: PullRequest) -> MergeResult:
        """Merge ``pr`` if GitHub says it is mergeable with its protection satisfied and every
        check on its head passed; pinned to that head commit. Never bypasses protection.

        :returns: ``merged`` (with the merge commit), ``conflict`` (``dirty``: does not merge;
            ``behind``: the base moved and protection wants the branch up to date; 409: the
            head moved), or ``blocked`` (``blocked``/``draft``/unknown mergeability, checks
            pending or failed, 405 and 403 in GitHub's words).
        """
        for _ in range(MERGEABLE_POLLS):
            data = await self._get_pull(pr)
            if data.get("merged"):
                return MergeResult("merged", "already merged", data.get("merge_commit_sha"))
            if data.get("state") != "open":
                return MergeResult("blocked", f"pull request #{pr.number} is {data.get('state')}")
            if data.get("mergeable") is not None and data.get("mergeable_state") not in (None, "unknown"):
                break
            await asyncio.sleep(self.mergeable_poll_s)  # GitHub computes mergeability in the background
        else:
            return MergeResult("blocked", f"GitHub has not computed whether #{pr.number} is mergeable yet")
        mstate, head_sha = data.get("mergeable_state"), data["head"]["sha"]
        if data.get("mergeable") is False or mstate == "dirty":
            return MergeResult("conflict", f"#{pr.number} does not merge cleanly into {data['base']['ref']} "
                                           f"(GitHub: mergeable_state {mstate})")
        if mstate == "behind":
            return MergeResult("conflict", f"#{pr.number} is behind {data['base']['ref']} and branch protection "
                                           "requires it up to date (GitHub: mergeable_state behind)")
        if mstate not in ("clean", "has_hooks", "unstable"):
            return MergeResult("blocked", f"#{pr.number} is not mergeable yet (GitHub: mergeable_state {mstate}: "
                                          "required reviews or checks, or a draft)")
        checks = await self._checks_of(head_sha)
        if checks not in ("success", "none"):
            return MergeResult("blocked", f"checks are {checks} on {head_sha[:12]}")
        path = f"{self._base}/pulls/{int(pr.number)}/merge"
        for _ in range(MERGE_TRIES):
            status, out, headers = await self._call(
                "PUT", path, body={"sha": head_sha, "merge_method": "merge",
                                   "commit_title": f"Merge pull request #{pr.number} from {pr.head}"})
            msg = _message(out)
            if status == 200 and isinstance(out, dict) and out.get("merged"):
                return MergeResult("merged", msg, out.get("sha"))
            if status == 405:
                return MergeResult("blocked", f"GitHub: {msg}")
            if status == 409:
                return MergeResult("conflict", f"the head moved since it was checked (GitHub: {msg})")
            if status == 403 and headers.get("x-ratelimit-remaining") != "0":
                return MergeResult("blocked", f"GitHub: {msg} (403: the token may not merge here)")
            if status == 422 and "base branch was modified" in msg.lower():
                continue  # GitHub's own advice: try again
            raise self._fail("PUT", path, status, out, headers)
        return MergeResult("conflict", f"the base kept moving while merging #{pr.number} (GitHub: {msg})")

    # -- clean-up of superseded work (after the job ended for good) -----------------------------

    async def close_pull_request(self, pr: PullRequest) -> str:
        """Close ``pr`` (``PATCH .../pulls/{n}`` with ``state: closed``) if it is open; a merged
        or closed one is left as it is. Returns its state after."""
        cur = self._pull(await self._get_pull(pr), pr.repo)
        if cur.state != "open":
            return cur.state
        path = f"{self._base}/pulls/{int(pr.number)}"
        status, data, headers = await self._call("PATCH", path, body={"state": "closed"})
        if status != 200 or not isinstance(data, dict):
            raise self._fail("PATCH", path, status, data, headers)
        return self._pull(data, pr.repo).state

    async def branches(self, prefix: str) -> dict[str, str]:
        """Branches under ``prefix`` (``GET .../git/matching-refs/heads/<prefix>``): name -> sha."""
        path = f"{self._base}/git/matching-refs/heads/{urllib.parse.quote(prefix, safe='/')}"
        status, data, headers = await self._call("GET", path)
        if status != 200 or not isinstance(data, list):
            raise self._fail("GET", path, status, data, headers)
        out: dict[str, str] = {}
        for ref in data[:BRANCHES_LISTED_MAX]:
            name = str(ref.get("ref", "")) if isinstance(ref, dict) else ""
            sha = (ref.get("object") or {}).get("sha") if isinstance(ref, dict) else None
            if name.startswith("refs/heads/") and isinstance(sha, str):
                out[name[len("refs/heads/"):]] = sha
        return out

    async def delete_branch(self, branch: str, sha: str) -> bool:
        """Delete ``branch`` (``DELETE .../git/refs/heads/<branch>``) if it is still at ``sha``
        as read just before (GitHub has no compare-and-swap on a deletion: a push between the
        read and the delete is lost with the branch; the clean-up only deletes branches no
        holder may push to any more). False when it is gone or moved."""
        ref = urllib.parse.quote(branch, safe="/")
        path = f"{self._base}/git/ref/heads/{ref}"
        status, data, headers = await self._call("GET", path)
        if status == 404:
            return False
        if status != 200 or not isinstance(data, dict):
            raise self._fail("GET", path, status, data, headers)
        if (data.get("object") or {}).get("sha") != sha:
            return False
        path = f"{self._base}/git/refs/heads/{ref}"
        status, data, headers = await self._call("DELETE", path)
        if status == 204:
            return True
        if status == 422 and "does not exist" in _message(data).lower():
            return False
        raise self._fail("DELETE", path, status, data, headers)


def _message(payload: Any, errors: bool = False) -> str:
    """GitHub's ``message`` (and with ``errors``, its validation errors' messages)."""
    if not isinstance(payload, dict):
        return ""
    parts = [str(payload.get("message") or "")]
    if errors:
        for e in payload.get("errors") or ():
            parts.append(str(e.get("message") or e.get("code") or "") if isinstance(e, dict) else str(e))
    return "; ".join(p for p in parts if p)[:ERROR_TEXT_CHARS]


def _ts(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return 0.0

"""A scripted GitHub: a loopback HTTP server implementing the REST endpoints the GitHub forge
uses, with GitHub's request and response shapes (from its published REST description), so
the forge is tested (and demonstrated) with no network and no account.

It is a model, not a mirror: repositories, branches and commits are names and fake SHAs set
by the test (:meth:`GitHubServer.add_repo`, :meth:`push`, :meth:`add_check_run`,
:meth:`add_status`); pull requests are computed from them the way GitHub reports them
(``mergeable``, ``mergeable_state``), and its errors are GitHub's: 401 ``Bad credentials``,
404 ``Not Found``, 405 ``Pull Request is not mergeable``, 409 ``Head branch was modified``,
422 ``Validation Failed`` (a pull request already exists, no commits between the branches).
Further answers can be scripted with :meth:`fail_next` (a status and body for the next
request matching a method and path).

Served endpoints (``{o}/{r}`` a repository added with :meth:`add_repo`)::

    GET  /repos/{o}/{r}/pulls?head=&base=&state=&per_page=&page=
    POST /repos/{o}/{r}/pulls
    GET  /repos/{o}/{r}/pulls/{n}
    PATCH /repos/{o}/{r}/pulls/{n}                      (title, body, state open/closed)
    PUT  /repos/{o}/{r}/pulls/{n}/merge
    GET  /repos/{o}/{r}/git/matching-refs/heads/{prefix}
    GET  /repos/{o}/{r}/git/ref/heads/{branch}
    DELETE /repos/{o}/{r}/git/refs/heads/{branch}       (204; 422 "Reference does not exist")
    GET  /repos/{o}/{r}/commits/{ref}/check-runs?per_page=&page=
    GET  /repos/{o}/{r}/commits/{ref}/status
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DOCS = "https://docs.github.com/rest"
MAX_REQUEST_BYTES = 1024 * 1024
"""Largest request body the server reads (GitHub's own limits are far above what the forge sends)."""
REQUESTS_KEPT = 1000
"""How many requests :attr:`GitHubServer.requests` keeps (oldest dropped)."""


def fake_sha(text: str) -> str:
    """A 40-hex commit id derived from ``text`` (stable across runs)."""
    return hashlib.sha1(text.encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Repo:
    owner: str
    name: str
    branches: dict[str, str] = field(default_factory=dict)
    pulls: dict[int, dict] = field(default_factory=dict)
    check_runs: dict[str, list[dict]] = field(default_factory=dict)
    statuses: dict[str, list[dict]] = field(default_factory=dict)
    required_checks: list[str] = field(default_factory=list)
    """Check names branch protection requires on the base (mergeable_state ``blocked`` until
    each has concluded ``success`` on the head)."""
    required_reviews: int = 0
    """Approving reviews protection requires (none are ever given here: ``blocked``)."""
    strict: bool = False
    """Protection requires the head to contain the base (``behind`` otherwise)."""
    conflicts: set[str] = field(default_factory=set)
    """Head branches that do not merge cleanly into their base (``dirty``)."""
    ancestry: dict[str, set[str]] = field(default_factory=dict)
    """sha -> the shas it contains (for ``behind``)."""
    mergeable_after_reads: int = 0
    """Pull request reads answering ``mergeable: null`` before GitHub "has computed" it."""
    next_number: int = 1
    next_id: int = 1000
    git_dir: str | None = None
    """A real bare repository whose branches this one follows (read at every request): what a
    factory pushes there is what this GitHub reports. Merges stay in the model (``base`` here
    moves to a fake merge commit; the bare repository's does not)."""
    git_seen: dict[str, str] = field(default_factory=dict)
    """The branch heads last read from ``git_dir`` (only their changes are applied)."""
    checks_on_push: list[str] = field(default_factory=list)
    """Check runs started (``in_progress``) on every new head read from ``git_dir``, as a CI
    would; :meth:`GitHubServer.complete_check` finishes one."""


class GitHubServer:
    """The server. ``with GitHubServer(token) as gh:`` starts it on a free loopback port
    (``gh.api_url``) and stops it after.

    :param token: the token requests must carry (``Authorization: Bearer`` or ``token``).
    """

    def __init__(self, token: str = "test-token") -> None:
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[dict[str, Any]] = []
        """Every request: method, path, query, body (JSON), and whether it was authorised."""
        self._script: list[tuple[str, re.Pattern, int, Any, dict[str, str]]] = []
        self._move_head: dict[tuple[str, str, int], str] = {}
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "GitHubServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet; requests are kept in server.requests
                pass

            def _serve(self) -> None:
                server._handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="github-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "GitHubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def api_url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- the model --------------------------------------------------------------------------------

    def add_repo(self, owner: str, name: str, branches: dict[str, str] | None = None, **opts: Any) -> Repo:
        """Add ``owner/name`` with ``branches`` (name -> sha; default ``main``)."""
        with self.lock:
            repo = Repo(owner, name, dict(branches or {"main": fake_sha(f"{owner}/{name}:main")}), **opts)
            self.repos[(owner.lower(), name.lower())] = repo
            return repo

    def push(self, owner: str, name: str, branch: str, sha: str, *, contains: tuple[str, ...] = ()) -> None:
        """Point ``branch`` at ``sha`` (which contains the commits ``contains``); open pull
        requests from it follow, as on GitHub."""
        with self.lock:
            repo = self.repos[(owner.lower(), name.lower())]
            old = repo.branches.get(branch)
            repo.branches[branch] = sha
            repo.ancestry[sha] = {sha, *contains, *([old] if old else []), *repo.ancestry.get(old or "", set())}
            for pr in repo.pulls.values():
                if pr["head"]["ref"] == branch and pr["state"] == "open":
                    pr["head"]["sha"] = sha

    def add_check_run(self, owner: str, name: str, sha: str, check: str, status: str = "completed",
                      conclusion: str | None = "success") -> None:
        with self.lock:
            self._add_check_run(self.repos[(owner.lower(), name.lower())], sha, check, status, conclusion)

    def complete_check(self, owner: str, name: str, sha: str, check: str, conclusion: str = "success") -> None:
        """Finish the check runs named ``check`` on ``sha`` with ``conclusion``."""
        with self.lock:
            for r in self.repos[(owner.lower(), name.lower())].check_runs.get(sha, []):
                if r["name"] == check:
                    r.update(status="completed", conclusion=conclusion, completed_at=_now())

    def _add_check_run(self, repo: Repo, sha: str, check: str, status: str, conclusion: str | None) -> None:
        owner, name = repo.owner, repo.name
        repo.next_id += 1
        repo.check_runs.setdefault(sha, []).append({
            "id": repo.next_id, "head_sha": sha, "node_id": f"CR_{repo.next_id}", "external_id": "",
            "url": f"{self.api_url}/repos/{owner}/{name}/check-runs/{repo.next_id}",
            "html_url": f"https://github.com/{owner}/{name}/runs/{repo.next_id}", "details_url": "",
            "status": status, "conclusion": conclusion if status == "completed" else None,
            "started_at": _now(), "completed_at": _now() if status == "completed" else None,
            "name": check, "output": {"title": None, "summary": None, "text": None,
                                      "annotations_count": 0, "annotations_url": ""},
            "check_suite": {"id": 1}, "app": None, "pull_requests": []})

    def add_status(self, owner: str, name: str, sha: str, context: str, state: str) -> None:
        with self.lock:
            repo = self.repos[(owner.lower(), name.lower())]
            repo.next_id += 1
            repo.statuses.setdefault(sha, []).append({
                "id": repo.next_id, "node_id": f"SC_{repo.next_id}", "state": state, "context": context,
                "description": None, "target_url": None, "avatar_url": None,
                "url": f"{self.api_url}/repos/{owner}/{name}/statuses/{sha}",
                "created_at": _now(), "updated_at": _now()})

    def fail_next(self, method: str, path_regex: str, status: int, body: Any = None,
                  headers: dict[str, str] | None = None) -> None:
        """Answer the next ``method`` request whose path matches ``path_regex`` with ``status``,
        ``body`` (GitHub's error shape by default) and ``headers`` instead of serving it."""
        with self.lock:
            self._script.append((method, re.compile(path_regex), status,
                                 body if body is not None else {"message": "Server Error", "documentation_url": DOCS},
                                 headers or {}))

    def move_head_before_merge(self, owner: str, name: str, number: int, sha: str) -> None:
        """When pull request ``number`` is next merged, its head is first pushed to ``sha``
        (someone pushed between the forge's check and its merge)."""
        with self.lock:
            self._move_head[(owner.lower(), name.lower(), number)] = sha

    # -- serving ----------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            return self._send(h, 413, {"message": "Payload too large"})
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return self._send(h, 400, {"message": "Problems parsing JSON", "documentation_url": DOCS})
        auth = h.headers.get("Authorization") or ""
        authorised = auth in (f"Bearer {self.token}", f"token {self.token}")
        with self.lock:
            self.requests.append({"method": h.command, "path": url.path, "query": query, "body": body,
                                  "authorised": authorised, "accept": h.headers.get("Accept"),
                                  "api_version": h.headers.get("X-GitHub-Api-Version")})
            del self.requests[:-REQUESTS_KEPT]
            for i, (method, rx, status, out, extra) in enumerate(self._script):
                if method == h.command and rx.search(url.path):
                    del self._script[i]
                    return self._send(h, status, out, extra)
            if not authorised:
                return self._send(h, 401, {"message": "Bad credentials", "documentation_url": DOCS})
            status, out = self._route(h.command, url.path, query, body)
        self._send(h, status, out)

    def _send(self, h: BaseHTTPRequestHandler, status: int, out: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if status == 204 else json.dumps(out).encode()  # 204: no body, as GitHub sends
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("X-GitHub-Api-Version-Selected", "2022-11-28")
        h.end_headers()
        h.wfile.write(data)

    def _follow_git(self, repo: Repo) -> None:
        """Apply what changed in ``repo.git_dir`` since the last read (a push is a push)."""
        out = subprocess.run(["git", "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads/"],
                             cwd=repo.git_dir, capture_output=True, text=True, timeout=30, check=True).stdout
        for line in out.splitlines():
            branch, sha = line.split(" ", 1)
            if repo.git_seen.get(branch) != sha:
                repo.git_seen[branch] = sha
                parents = subprocess.run(["git", "rev-list", "--max-count=1000", sha], cwd=repo.git_dir,
                                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
                old = repo.branches.get(branch)
                repo.branches[branch] = sha
                repo.ancestry[sha] = {sha, *parents, *([old] if old else [])}
                for pr in repo.pulls.values():
                    if pr["head"]["ref"] == branch and pr["state"] == "open":
                        pr["head"]["sha"] = sha
                for check in repo.checks_on_push:
                    self._add_check_run(repo, sha, check, "in_progress", None)

    def _route(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        m = re.fullmatch(r"/repos/([^/]+)/([^/]+)(/.*)", path)
        repo = self.repos.get((m[1].lower(), m[2].lower())) if m else None
        if repo is None:
            return 404, {"message": "Not Found", "documentation_url": DOCS}
        if repo.git_dir:
            self._follow_git(repo)
        rest = m[3]
        if rest == "/pulls" and method == "GET":
            return 200, self._list(repo, query)
        if rest == "/pulls" and method == "POST":
            return self._create(repo, body or {})
        if (n := re.fullmatch(r"/pulls/(\d+)", rest)) and method == "GET":
            pr = repo.pulls.get(int(n[1]))
            return (200, self._view(repo, pr)) if pr else (404, {"message": "Not Found", "documentation_url": DOCS})
        if (n := re.fullmatch(r"/pulls/(\d+)", rest)) and method == "PATCH":
            return self._update(repo, int(n[1]), body or {})
        if (r := re.fullmatch(r"/git/matching-refs/heads/(.*)", rest)) and method == "GET":
            prefix = urllib.parse.unquote(r[1])
            return 200, [self._ref(repo, b) for b in sorted(repo.branches) if b.startswith(prefix)]
        if (r := re.fullmatch(r"/git/ref/heads/(.+)", rest)) and method == "GET":
            b = urllib.parse.unquote(r[1])
            return (200, self._ref(repo, b)) if b in repo.branches else (404, {"message": "Not Found",
                                                                                "documentation_url": DOCS})
        if (r := re.fullmatch(r"/git/refs/heads/(.+)", rest)) and method == "DELETE":
            return self._delete_ref(repo, urllib.parse.unquote(r[1]))
        if (n := re.fullmatch(r"/pulls/(\d+)/merge", rest)) and method == "PUT":
            return self._merge(repo, int(n[1]), body or {})
        if (c := re.fullmatch(r"/commits/([^/]+)/check-runs", rest)) and method == "GET":
            runs = repo.check_runs.get(repo.branches.get(c[1], c[1]), [])
            per, page = min(int(query.get("per_page", 30)), 100), int(query.get("page", 1))
            return 200, {"total_count": len(runs), "check_runs": runs[(page - 1) * per:page * per]}
        if (c := re.fullmatch(r"/commits/([^/]+)/status", rest)) and method == "GET":
            sha = repo.branches.get(c[1], c[1])
            sts = repo.statuses.get(sha, [])
            states = {s["state"] for s in sts}
            state = ("failure" if states & {"failure", "error"} else
                     "pending" if not sts or "pending" in states else "success")
            return 200, {"state": state, "statuses": sts, "sha": sha, "total_count": len(sts),
                         "repository": {"full_name": f"{repo.owner}/{repo.name}"}, "commit_url": "", "url": ""}
        return 404, {"message": "Not Found", "documentation_url": DOCS}

    def _list(self, repo: Repo, query: dict) -> list[dict]:
        out = []
        for pr in sorted(repo.pulls.values(), key=lambda p: -p["number"]):
            state = query.get("state", "open")
            if state != "all" and pr["state"] != state:
                continue
            if "head" in query and pr["head"]["label"] != query["head"]:
                continue
            if "base" in query and pr["base"]["ref"] != query["base"]:
                continue
            out.append(self._view(repo, pr, listed=True))
        per, page = min(int(query.get("per_page", 30)), 100), int(query.get("page", 1))
        return out[(page - 1) * per:page * per]

    def _create(self, repo: Repo, body: dict) -> tuple[int, Any]:
        def invalid(field_: str, code: str = "invalid", message: str | None = None) -> tuple[int, Any]:
            err = {"resource": "PullRequest", "field": field_, "code": code}
            if message:
                err = {"resource": "PullRequest", "code": "custom", "message": message}
            return 422, {"message": "Validation Failed", "errors": [err], "documentation_url": DOCS}

        title, head, base = body.get("title"), body.get("head"), body.get("base")
        if not title:
            return invalid("title", "missing_field")
        if head not in repo.branches:
            return invalid("head")
        if base not in repo.branches:
            return invalid("base")
        label = f"{repo.owner}:{head}"
        if any(p["head"]["label"] == label and p["base"]["ref"] == base and p["state"] == "open"
               for p in repo.pulls.values()):
            return invalid("", message=f"A pull request already exists for {label}.")
        if repo.branches[head] in repo.ancestry.get(repo.branches[base], {repo.branches[base]}):
            return invalid("", message=f"No commits between {base} and {head}")
        n = repo.next_number
        repo.next_number += 1
        repo.next_id += 1
        html = f"https://github.com/{repo.owner}/{repo.name}/pull/{n}"
        repo.pulls[n] = {
            "url": f"{self.api_url}/repos/{repo.owner}/{repo.name}/pulls/{n}", "id": repo.next_id,
            "node_id": f"PR_{repo.next_id}", "html_url": html, "number": n, "state": "open", "locked": False,
            "title": title, "body": body.get("body"), "user": {"login": "gigafactory-bot", "type": "User"},
            "created_at": _now(), "updated_at": _now(), "closed_at": None, "merged_at": None,
            "merge_commit_sha": None, "draft": bool(body.get("draft")),
            "head": {"label": label, "ref": head, "sha": repo.branches[head]},
            "base": {"label": f"{repo.owner}:{base}", "ref": base, "sha": repo.branches[base]},
            "merged": False, "mergeable": None, "rebaseable": None, "mergeable_state": "unknown",
            "maintainer_can_modify": bool(body.get("maintainer_can_modify", False)),
            "_reads": 0,
        }
        return 201, self._view(repo, repo.pulls[n])

    def _mergeability(self, repo: Repo, pr: dict) -> tuple[bool | None, str]:
        if pr["state"] != "open":
            return None, "unknown"
        if pr["_reads"] < repo.mergeable_after_reads:
            return None, "unknown"
        head_sha = pr["head"]["sha"]
        if pr["head"]["ref"] in repo.conflicts:
            return False, "dirty"
        if pr["draft"]:
            return True, "draft"
        if repo.strict and repo.branches[pr["base"]["ref"]] not in repo.ancestry.get(head_sha, {head_sha}):
            return True, "behind"
        runs = {r["name"]: r for r in repo.check_runs.get(head_sha, [])}
        if repo.required_reviews or any(runs.get(c, {}).get("conclusion") != "success" for c in repo.required_checks):
            return True, "blocked"
        if any(r["status"] == "completed" and r["conclusion"] not in ("success", "neutral", "skipped")
               for r in runs.values()):
            return True, "unstable"
        return True, "clean"

    def _view(self, repo: Repo, pr: dict, listed: bool = False) -> dict:
        out = {k: v for k, v in pr.items() if not k.startswith("_")}
        out["base"] = {**pr["base"], "sha": repo.branches[pr["base"]["ref"]]}
        if listed:  # the list's "pull-request-simple" has no merge state
            for k in ("merged", "mergeable", "rebaseable", "mergeable_state", "maintainer_can_modify"):
                out.pop(k, None)
            return out
        pr["_reads"] += 1
        out["mergeable"], out["mergeable_state"] = self._mergeability(repo, pr)
        return out

    def _ref(self, repo: Repo, branch: str) -> dict:
        """A git reference as GitHub shows one (``GET .../git/ref/heads/<branch>``)."""
        sha = repo.branches[branch]
        base = f"https://api.github.com/repos/{repo.owner}/{repo.name}/git"
        return {"ref": f"refs/heads/{branch}", "node_id": f"REF_{fake_sha(branch)[:12]}",
                "url": f"{base}/refs/heads/{branch}",
                "object": {"sha": sha, "type": "commit", "url": f"{base}/commits/{sha}"}}

    def _delete_ref(self, repo: Repo, branch: str) -> tuple[int, Any]:
        """``DELETE .../git/refs/heads/<branch>``: 204, or 422 "Reference does not exist". A repo
        that follows a real bare repository deletes the branch there too (as a push would)."""
        if branch not in repo.branches:
            return 422, {"message": "Reference does not exist", "documentation_url": DOCS}
        del repo.branches[branch]
        if repo.git_dir:
            subprocess.run(["git", "update-ref", "-d", f"refs/heads/{branch}"], cwd=repo.git_dir,
                           capture_output=True, timeout=30, check=True)
            repo.git_seen.pop(branch, None)
        return 204, None

    def _update(self, repo: Repo, n: int, body: dict) -> tuple[int, Any]:
        """``PATCH .../pulls/{n}``: title, body, and ``state`` open/closed (a merged pull request
        cannot be reopened: 422, as GitHub answers)."""
        pr = repo.pulls.get(n)
        if pr is None:
            return 404, {"message": "Not Found", "documentation_url": DOCS}
        state = body.get("state")
        if state not in (None, "open", "closed"):
            return 422, {"message": "Validation Failed", "documentation_url": DOCS,
                         "errors": [{"resource": "PullRequest", "field": "state", "code": "invalid"}]}
        if state == "open" and pr.get("merged"):
            return 422, {"message": "Validation Failed", "documentation_url": DOCS,
                         "errors": [{"resource": "PullRequest", "code": "custom",
                                     "message": "state cannot be changed. The pull request cannot be reopened."}]}
        for k in ("title", "body"):
            if isinstance(body.get(k), str):
                pr[k] = body[k]
        if state and state != pr["state"] and not pr.get("merged"):
            pr["state"] = state
            pr["closed_at"] = _now() if state == "closed" else None
        pr["updated_at"] = _now()
        return 200, self._view(repo, pr)

    def _merge(self, repo: Repo, n: int, body: dict) -> tuple[int, Any]:
        pr = repo.pulls.get(n)
        if pr is None:
            return 404, {"message": "Not Found", "documentation_url": DOCS}
        moved = self._move_head.pop((repo.owner.lower(), repo.name.lower(), n), None)
        if moved:
            repo.branches[pr["head"]["ref"]] = moved
            repo.ancestry[moved] = {moved, pr["head"]["sha"]}
            pr["head"]["sha"] = moved
        if pr["state"] != "open":
            return 405, {"message": "Pull Request is not mergeable", "documentation_url": DOCS}
        if body.get("sha") and body["sha"] != pr["head"]["sha"]:
            return 409, {"message": "Head branch was modified. Review and try the merge again.",
                         "documentation_url": DOCS}
        pr["_reads"] = max(pr["_reads"], repo.mergeable_after_reads)
        mergeable, state = self._mergeability(repo, pr)
        if not mergeable:
            return 405, {"message": "Pull Request is not mergeable", "documentation_url": DOCS}
        if state == "blocked":
            why = ("At least 1 approving review is required by reviewers with write access." if repo.required_reviews
                   else f"Required status check \"{repo.required_checks[0]}\" is expected.")
            return 405, {"message": why, "documentation_url": DOCS}
        if state == "behind":
            return 405, {"message": "Head branch is out of date. Review and try the merge again.",
                         "documentation_url": DOCS}
        base = pr["base"]["ref"]
        merge_sha = fake_sha(f"merge:{repo.branches[base]}:{pr['head']['sha']}")
        repo.ancestry[merge_sha] = {merge_sha, *repo.ancestry.get(repo.branches[base], {repo.branches[base]}),
                                    *repo.ancestry.get(pr["head"]["sha"], {pr["head"]["sha"]})}
        repo.branches[base] = merge_sha
        pr.update(state="closed", merged=True, merged_at=_now(), closed_at=_now(), merge_commit_sha=merge_sha,
                  updated_at=_now())
        return 200, {"sha": merge_sha, "merged": True, "message": "Pull Request successfully merged"}

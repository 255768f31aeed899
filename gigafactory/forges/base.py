"""The forge interface: where a job's branch becomes a pull request and, if the job's
``review-policy`` says so, a merge.

One module per forge (``local.py``: a bare repository plus pull request records in the
broker; ``github.py``: GitHub's REST API). A forge module exports ``KIND`` (its name),
``detect(remote) -> bool`` (whether a repository URL or path belongs to it) and
``make(remote, ctx) -> Forge``; :data:`FORGE_MODULES` lists them in the order
:func:`forge_for` asks. GitLab or Gitea is one more module and one more line there.

Every method is a coroutine: the local forge talks to the broker, the HTTP forges run their
blocking requests in a thread, and the factory awaits either the same way.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec

ChecksState = Literal["pending", "success", "failure", "none"]
"""The checks of a pull request's head commit, summarised: ``none`` (nothing reported or
required), ``pending`` (something still runs or has not reported), ``failure`` (one failed,
was cancelled or timed out), ``success`` (every one that reported passed)."""
CHECKS_STATES: tuple[str, ...] = ("pending", "success", "failure", "none")

PullState = Literal["open", "merged", "closed"]
MergeOutcome = Literal["merged", "conflict", "blocked"]


class ForgeError(Exception):
    """A forge refused a request or did not answer usably; the message says which forge, which
    request, what it said and what to check. Never contains a credential."""


class ForgeAuthError(ForgeError):
    """The forge refused the credential (HTTP 401, or 403 without a rate limit): the attempt's
    failure class is ``auth_failed``."""


class ForgeNotFound(ForgeError):
    """The repository or pull request does not exist, or the credential cannot see it."""


class PullRequest(msgspec.Struct, omit_defaults=True):
    """A pull request as a forge reports it (and as the local forge stores it).

    ``repo`` is the job's ``repo`` (the remote's URL or path) as given to
    :meth:`Forge.open_pull_request`; ``head`` and ``base`` are branch names;
    ``head_sha`` is the head commit when the forge last reported it."""

    number: int
    repo: str
    head: str
    base: str
    title: str
    body: str = ""
    state: PullState = "open"
    head_sha: str = ""
    url: str = ""
    """Where a human reads it (GitHub's ``html_url``; empty for the local forge)."""
    merge_sha: str | None = None
    """The merge commit, once merged."""
    created_at: float = 0.0
    updated_at: float = 0.0


class MergeResult(msgspec.Struct, omit_defaults=True):
    """What :meth:`Forge.merge` did.

    - ``merged``: ``base`` now contains the head; ``sha`` is the merge commit.
    - ``conflict``: the head does not merge cleanly into ``base`` (or ``base`` or the head
      moved under the merge): a new attempt from the new base may succeed (``rebase-needed``).
    - ``blocked``: the forge's gate is not open (checks pending or failed, branch protection,
      reviews, permissions); nothing was changed and nothing was bypassed.
    ``reason`` is the forge's own words where it gave some."""

    outcome: MergeOutcome
    reason: str = ""
    sha: str | None = None

    @property
    def merged(self) -> bool:
        return self.outcome == "merged"


@runtime_checkable
class Forge(Protocol):
    """What the factory asks of a forge. ``repo`` is the job's ``repo`` value."""

    kind: str

    async def open_pull_request(self, repo: str, head: str, base: str, title: str, body: str) -> PullRequest:
        """Open a pull request from branch ``head`` into ``base``; idempotent: when one is
        already open for ``head``, return it (its title and body are left as they are)."""
        ...

    async def checks(self, pr: PullRequest) -> ChecksState:
        """The summarised checks of ``pr``'s current head commit."""
        ...

    async def merge(self, pr: PullRequest) -> MergeResult:
        """Merge ``pr`` into its base if the forge's gate is open; never bypasses it."""
        ...

    async def close_pull_request(self, pr: PullRequest) -> PullState:
        """Close ``pr`` without merging (a superseded epoch's pull request); idempotent: a
        closed one stays closed, a merged one is left as it is. Returns its state after."""
        ...

    async def branches(self, prefix: str) -> dict[str, str]:
        """The remote's branches whose names start with ``prefix`` (``gf/<job>/``): name -> head
        commit (at most :data:`BRANCHES_LISTED_MAX`)."""
        ...

    async def delete_branch(self, branch: str, sha: str) -> bool:
        """Delete ``branch`` from the remote if it is still at ``sha`` (where the forge can
        compare-and-swap; GitHub cannot and deletes it as it is). False when it was already
        gone or had moved (then it is kept)."""
        ...


BRANCHES_LISTED_MAX = 1000
"""Branches one :meth:`Forge.branches` call returns (a job has one per epoch plus its WIP)."""


@dataclass
class ForgeContext:
    """What a forge module may need to build a forge for one remote.

    :param store: the broker (the local forge keeps its pull request records there).
    :param github_token: the token for GitHub (from the job's ``cred:github_token`` or
        ``cred:gh_token``); None when the factory has none.
    :param github_api_url: GitHub's API root (``https://api.github.com``, or an Enterprise
        server's ``https://HOST/api/v3``).
    :param http_timeout_s: the bound on every HTTP request of an HTTP forge.
    :param extra: further values for forges added later (a GitLab token, ...).
    """

    store: Any = None
    github_token: str | None = None
    github_api_url: str = "https://api.github.com"
    http_timeout_s: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never print a token
        return (f"ForgeContext(store={self.store!r}, github_token={'***' if self.github_token else None}, "
                f"github_api_url={self.github_api_url!r}, http_timeout_s={self.http_timeout_s!r})")


GITHUB_TOKEN_VARS: tuple[str, ...] = ("GITHUB_TOKEN", "GH_TOKEN")
"""Where a factory finds its GitHub token (the ``cred:github_token`` / ``cred:gh_token``
capabilities its probe reports), the first one set wins."""


def context_from(settings, store=None, environ: dict[str, str] | None = None) -> ForgeContext:
    """The forge context of a factory: its settings (``github_api_url``,
    ``forge_http_timeout_s``), its broker, and the GitHub token from ``environ`` (default:
    the process environment)."""
    import os

    env = os.environ if environ is None else environ
    token = next((env[v] for v in GITHUB_TOKEN_VARS if env.get(v)), None)
    return ForgeContext(store=store, github_token=token, github_api_url=settings.github_api_url,
                        http_timeout_s=settings.forge_http_timeout_s)


FORGE_MODULES: dict[str, str] = {
    "github": "gigafactory.forges.github",
    "local": "gigafactory.forges.local",
}
"""Forge kind -> module, in the order :func:`forge_for` asks them to ``detect`` a remote
(the most specific first; ``local`` takes paths and ``file://`` URLs)."""
FORGE_KINDS: tuple[str, ...] = ("auto", *FORGE_MODULES)


def forge_for(remote: str, ctx: ForgeContext, kind: str = "auto") -> Forge:
    """The forge for a job's ``repo`` remote.

    :param remote: the job's ``repo`` (a URL such as ``https://github.com/o/r.git`` or
        ``git@github.com:o/r.git``, a local path, or a ``file://`` URL).
    :param ctx: what the forge may need (broker, credentials, timeouts).
    :param kind: ``auto`` (ask each module in :data:`FORGE_MODULES` whether it knows the
        remote) or a forge's name (a GitHub Enterprise host is not recognised by its URL:
        name ``github`` and set ``github_api_url``).
    :raises ForgeError: no forge knows the remote, or ``kind`` is not one of
        :data:`FORGE_KINDS`.
    """
    if kind not in FORGE_KINDS:
        raise ForgeError(f"forge {kind!r} is not known; expected one of {', '.join(FORGE_KINDS)}")
    names = list(FORGE_MODULES) if kind == "auto" else [kind]
    for name in names:
        mod = importlib.import_module(FORGE_MODULES[name])
        if kind != "auto" or mod.detect(remote):
            return mod.make(remote, ctx)
    raise ForgeError(f"no forge knows the repository {remote!r}: a local path or file:// URL uses the local "
                     f"forge, a github.com URL the GitHub forge; for another host set the forge "
                     f"(GIGAFACTORY_FORGE, one of {', '.join(FORGE_KINDS[1:])})")

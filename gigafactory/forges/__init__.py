"""Forges: where a job's pushed branch becomes a pull request and, by ``review-policy``, a
merge. See :mod:`.base` for the interface, :mod:`.local` and :mod:`.github` for the two
forges, and :mod:`.body` for the pull request's text."""

from gigafactory.forges.base import (  # noqa: F401 (the package's interface)
    CHECKS_STATES,
    FORGE_KINDS,
    ChecksState,
    Forge,
    ForgeAuthError,
    ForgeContext,
    ForgeError,
    ForgeNotFound,
    MergeResult,
    PullRequest,
    forge_for,
)

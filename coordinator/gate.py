"""The human gate's identity (pure): who called ``ship``, ``cancel`` or ``requeue``, and whether
that identity may ship the job.

With authentication on, a reviewer can call the gate only on its own subject
``gf.api.<endpoint>.reviewer.<name>`` (the broker enforces it: see
:func:`gigafactory.identity.permissions`), so the subject names the caller as the broker
authenticated it. The choice over a signature in the request: the broker already checked the
caller's nkey when it connected, the check costs nothing per request, and nothing in the
coordinator needs the identity store (which lives on the broker's machine).

- a reviewer is the actor, whatever the body says; it may ship a job whose ``review-policy``
  names reviewers only when its name is among them (``@`` ignored);
- an admin (operators: everything) may act on behalf of a named ``actor`` (the audit keeps both);
- the plain subject ``gf.api.<endpoint>`` (no identity) is refused to reviewers by the broker;
  on a broker without authentication it is the old, self-declared ``actor``.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from gigafactory.schemas.manifest import Reviewers

CALLER: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("gigafactory_api_caller",
                                                                               default=None)
"""The (role, name) the request's subject names (``gf.api.<endpoint>.<role>.<name>``, which the
broker lets only that identity publish to), set by the API wrapper for the handler it calls; None
on the plain endpoint subject. Never read from the request body: a client cannot claim an identity."""


PRODUCTS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("gigafactory_api_products",
                                                                                 default=None)
"""The products a submitter's subject (``gf.api.<submit|list|status>.submitter.<name>.<products>``)
limits the request to; None: every product (any other caller). Set by the API wrapper."""


class GateRefused(Exception):
    """The caller may not do this (403); the message says why and what to do."""


@dataclass(frozen=True)
class Actor:
    """Who acts: ``name`` is what the audit shows; ``identity``/``role`` the authenticated caller
    (None: unauthenticated, self-declared)."""

    name: str
    identity: str | None = None
    role: str | None = None

    def audit(self) -> dict:
        """The event data that records the caller."""
        return {"identity": self.identity, "role": self.role, "authenticated": self.identity is not None}


def actor(declared: str | None, caller: tuple[str, str] | None = None) -> Actor:
    """The actor of a gate request (see the module doc).

    :param declared: the ``actor`` the request body names (None or "": ``operator``).
    :param caller: the authenticated (role, name), else :data:`CALLER`'s value for this request.
    """
    declared = str(declared or "operator")
    caller = caller if caller is not None else CALLER.get()
    if not caller:
        return Actor(declared)
    role, name = caller
    if role == "reviewer":
        return Actor(name, name, role)
    return Actor(declared, name, role)


def check_ship(policy, who: Actor) -> None:
    """Refuse (:class:`GateRefused`) a reviewer who is not among the job's named reviewers."""
    if not isinstance(policy, Reviewers) or who.role != "reviewer":
        return
    allowed = policy.names()
    if who.identity not in allowed:
        raise GateRefused(f"{who.identity} is not a reviewer of this job (review-policy reviewers: "
                          f"{', '.join(policy.reviewers)}): ask one of them to ship it")


@dataclass(frozen=True)
class Quorum:
    """Where a ship stands against the job's quorum (:func:`quorum`).

    :param ships: the job ships now.
    :param approved: the distinct reviewers who approved this epoch, this ship included.
    :param new: this ship adds an approval (False: the reviewer had approved already, or no
        quorum applies).
    :param needed: the quorum."""

    ships: bool
    approved: tuple[str, ...]
    new: bool
    needed: int


def quorum(policy, who: Actor, approvals, epoch: int) -> Quorum:
    """Whether a ship by ``who`` ships the job now, or is one approval toward its quorum (pure).

    A listed reviewer's ship counts once per epoch (a reviewer cannot approve twice); the job
    ships when ``policy.quorum`` distinct listed reviewers approved. An admin (or any non-reviewer
    caller :func:`check_ship` let through) ships at once.

    :param policy: the job's ``review-policy``.
    :param who: the caller (:func:`actor`), already checked by :func:`check_ship`.
    :param approvals: the job record's approvals (``identity``, ``epoch``).
    :param epoch: the job's epoch (approvals of other epochs do not count)."""
    if not isinstance(policy, Reviewers) or who.role != "reviewer" or policy.quorum <= 1:
        return Quorum(True, (), False, 1)
    listed = policy.names()
    before = {a.identity for a in approvals if a.epoch == epoch and a.identity in listed}
    after = before | {who.identity}
    return Quorum(len(after) >= policy.quorum, tuple(sorted(after)), who.identity not in before, policy.quorum)


def may_see(product: str, products: tuple[str, ...] | None = None) -> bool:
    """Whether the caller may see or touch a job of ``product`` (pure).

    :param product: the job's ``product``.
    :param products: the caller's products, else :data:`PRODUCTS`'s value (None: every product)."""
    products = products if products is not None else PRODUCTS.get()
    return products is None or product in products


def check_products(jobs, products: tuple[str, ...] | None = None) -> None:
    """Refuse (:class:`GateRefused`) a submit with a job of a product not the caller's.

    :param jobs: (file, product) of each job of the batch.
    :param products: as :func:`may_see`."""
    products = products if products is not None else PRODUCTS.get()
    for file, product in jobs:
        if not may_see(product, products):
            raise GateRefused(f"{file}: product {product!r} is not one of this submitter's products "
                              f"({', '.join(products or ())}): ask an admin for an identity with "
                              f"--products {product}")

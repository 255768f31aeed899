"""The kill switch's state, pure: who is halted, how, and what a halt means for a job.

``gigafactory halt [--product P] [--drain|--stop]`` stores one :class:`HaltState` on the broker
(bucket :data:`~gigafactory.schemas.names.CONTROL_BUCKET`, key :data:`HALT_KEY`), so it survives
coordinator restarts and every coordinator and factory reads the same one:

- the scheduler holds every queued job it covers with a reason starting ``halted``
  (:func:`hold_reason`): nothing is offered;
- a factory claims nothing it covers (it follows the key with a watch, so a dispatch message
  already out is refused as soon as the change arrives, well within one heartbeat);
- with ``stop``, a factory stops the engines of the runs it covers and hands the jobs back
  (fenced, without charging a retry); with ``drain`` they finish.

A fleet-wide halt covers every product; a product's halt covers that product's jobs. Resuming
the fleet clears the fleet-wide halt only (product halts stay until resumed by name).
"""

from __future__ import annotations

import re

import msgspec

HALT_KEY = "halt"
"""The key of the state in the control bucket."""
HALT_MODES = ("drain", "stop")
"""``drain``: running jobs finish; ``stop``: they are stopped and handed back."""
HALT_PRODUCTS_MAX = 1000
"""At most this many products halted by name at once (the state is one KV value)."""
HALT_REASON_MAX_CHARS = 500
"""A halt's reason is cut to this."""
_PRODUCT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class HaltError(ValueError):
    """A halt or resume request that cannot be applied (message says what to do)."""


class Halt(msgspec.Struct, omit_defaults=True):
    """One halt: the fleet's or a product's."""

    mode: str
    """``drain`` or ``stop`` (:data:`HALT_MODES`)."""
    at: float
    """When it was asked for (the coordinator's clock, seconds since the epoch)."""
    actor: str = ""
    """Who asked (the API's actor)."""
    reason: str = ""


class HaltState(msgspec.Struct, omit_defaults=True):
    """What is halted now."""

    fleet: Halt | None = None
    """The fleet-wide halt (every product), or None."""
    products: dict[str, Halt] = msgspec.field(default_factory=dict)
    """Halts of single products, by product."""

    @property
    def any(self) -> bool:
        """Whether anything is halted."""
        return self.fleet is not None or bool(self.products)


def covering(state: HaltState | None, product: str) -> Halt | None:
    """The halt that covers ``product``'s jobs (the fleet's first), or None.

    :param state: the halt state (None: nothing halted).
    :param product: the job's ``product``."""
    if state is None:
        return None
    return state.fleet or state.products.get(product)


def hold_reason(state: HaltState, product: str) -> str | None:
    """The reason a queued job of ``product`` is held with while halted (it starts with
    ``halted``), or None when nothing covers it.

    :param state: the halt state.
    :param product: the job's product."""
    h = covering(state, product)
    if h is None:
        return None
    scope = "the fleet" if state.fleet is not None else f"product {product}"
    who = f" by {h.actor}" if h.actor else ""
    why = f": {h.reason}" if h.reason else ""
    return f"halted: {scope} ({h.mode}){who}{why}; 'gigafactory resume' dispatches again"


def describe(state: HaltState) -> str:
    """One line saying what is halted (``status``, ``factories``, ``top``, logs).

    :param state: the halt state."""
    if not state.any:
        return "not halted: dispatching"

    def one(scope: str, h: Halt) -> str:
        return (f"{scope} halted ({h.mode}{', by ' + h.actor if h.actor else ''})"
                + (f": {h.reason}" if h.reason else ""))

    parts = [one("fleet", state.fleet)] if state.fleet is not None else []
    parts += [one(f"product {product}", h) for product, h in sorted(state.products.items())]
    return "; ".join(parts)


def check_product(product: str | None) -> str | None:
    """``product`` checked as a product name (None: the fleet). Raises :class:`HaltError`.

    :param product: the ``--product`` given."""
    if product is None:
        return None
    if not _PRODUCT.fullmatch(product):
        raise HaltError(f"product {product!r} is not a product name (letters, digits, '.', '_', '-'; at most "
                        "128 characters)")
    return product


def halt(state: HaltState, *, product: str | None, mode: str, at: float, actor: str, reason: str = "") -> HaltState:
    """``state`` with a halt of ``product`` (None: the fleet) in ``mode`` added (replacing one
    of the same scope: ``halt --stop`` after ``halt --drain`` stops). Raises :class:`HaltError`.

    :param state: the current state.
    :param product: the product to halt, or None for the whole fleet.
    :param mode: ``drain`` or ``stop``.
    :param at: now (seconds since the epoch).
    :param actor: who asks.
    :param reason: why (cut to :data:`HALT_REASON_MAX_CHARS`)."""
    if mode not in HALT_MODES:
        raise HaltError(f"halt mode {mode!r}: use one of {', '.join(HALT_MODES)}")
    product = check_product(product)
    h = Halt(mode=mode, at=at, actor=actor[:200], reason=reason[:HALT_REASON_MAX_CHARS])
    if product is None:
        return HaltState(fleet=h, products=dict(state.products))
    if product not in state.products and len(state.products) >= HALT_PRODUCTS_MAX:
        raise HaltError(f"{HALT_PRODUCTS_MAX} products are halted already: halt the fleet instead")
    return HaltState(fleet=state.fleet, products={**state.products, product: h})


def resume(state: HaltState, *, product: str | None) -> HaltState:
    """``state`` without the halt of ``product`` (None: without the fleet-wide halt).

    :param state: the current state.
    :param product: the product to resume, or None for the fleet."""
    product = check_product(product)
    if product is None:
        return HaltState(fleet=None, products=dict(state.products))
    return HaltState(fleet=state.fleet, products={k: v for k, v in state.products.items() if k != product})


def decode_state(data: bytes | None) -> HaltState:
    """The state stored as ``data`` (None or empty: nothing halted). Raises :class:`HaltError`
    for bytes that are not a halt state (the caller decides: a factory treats it as halted).

    :param data: the KV value."""
    if not data:
        return HaltState()
    try:
        return msgspec.json.decode(data, type=HaltState)
    except msgspec.DecodeError as e:
        raise HaltError(f"the halt state is not readable ({e}); write it again with 'gigafactory halt' or "
                        "'gigafactory resume'") from None


def encode_state(state: HaltState) -> bytes:
    """The bytes stored for ``state``."""
    return msgspec.json.encode(state)


POLICY_HOLDS_KEY = "policy-holds"
"""The ``gf_control`` key where the dispatching coordinator says which pools have queued jobs it
holds by policy: a halt of their product, or their budget (issue 13). A factory whose free
stations serve one reads ``policy-paused`` rather than ``no-work``. Written only when the set
changes."""

POLICY_HOLDS_POOLS_MAX = 10_000
"""At most this many pools in the key (a fleet has far fewer; beyond, the rest are left out)."""


class PolicyHolds(msgspec.Struct, omit_defaults=True):
    """The value of :data:`POLICY_HOLDS_KEY`."""

    pools: list[str] = []
    """Pools with at least one queued job held ``halted: ...`` or ``budget: ...``, sorted."""
    at: float = 0.0
    """When the coordinator wrote it (epoch seconds)."""


def decode_policy_holds(data: bytes | None) -> PolicyHolds:
    """The stored policy holds (None or empty, or unreadable: none; a garbled key must not pause
    the fleet, the coordinator still holds the jobs themselves).

    :param data: the KV value."""
    if not data:
        return PolicyHolds()
    try:
        return msgspec.json.decode(data, type=PolicyHolds)
    except msgspec.DecodeError:
        return PolicyHolds()


def encode_policy_holds(pools: set[str], at: float) -> bytes:
    """The bytes stored for ``pools`` with work held by policy at ``at``."""
    return msgspec.json.encode(PolicyHolds(pools=sorted(pools)[:POLICY_HOLDS_POOLS_MAX], at=at))

"""``gigafactory top``: a full-screen live view of the fleet, built on textual.

It watches the broker, as the coordinator's own view does, and never polls the API: a KV
watch on ``gf_jobs``, ``gf_factories`` and ``gf_pools`` (a replay of the latest values, then
every change as the broker pushes it) and an ordered consumer on ``GF_EVENTS`` starting
``throughput_window_s`` back, so throughput is right from the first screen. What to show is
computed by :class:`gigafactory.topmodel.TopModel` (pure); this module is the feed (thin I/O)
and the widgets. The screen is redrawn at most every ``refresh_s`` and only when something
changed or ages moved, so a 100,000-job replay does not redraw 100,000 times.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

import nats.errors
from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Static

from gigafactory.schemas import names
from gigafactory.topmodel import (EVENTS_MAX_DEFAULT, THROUGHPUT_WINDOW_S_DEFAULT, Snapshot, TopModel,
                                  format_age)

log = logging.getLogger(__name__)

REFRESH_S_DEFAULT = 0.5
"""At most this often the screen is redrawn (and the ages on it move)."""
REWATCH_PAUSE_S = 1.0
"""Pause before watching a bucket again after its watch failed (or before it exists)."""
EVENTS_PENDING_MAX = 100_000
"""Events the client buffers before the view has taken them in: a slower view makes the
ordered consumer start again from the last event it took, never an unbounded buffer."""
_WATCHED = ((names.JOBS_BUCKET, "jobs"), (names.FACTORIES_BUCKET, "factories"), (names.POOLS_BUCKET, "pools"),
            (names.CONTROL_BUCKET, "control"))


# -- the feed: broker changes into the model ---------------------------------------------------

class Feed:
    """Keeps a :class:`TopModel` in step with the broker until cancelled.

    :param nc: a connected nats-py client (reconnecting on its own).
    :param model: the model to feed.
    :param request_timeout_s: bound of each JetStream request (bucket lookup, consumer set-up).
    """

    def __init__(self, nc, model: TopModel, request_timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.model = model
        self.js = nc.jetstream(timeout=request_timeout_s)
        self.synced: dict[str, asyncio.Event] = {kind: asyncio.Event() for _, kind in _WATCHED}
        self.problems: dict[str, str] = {}
        """What is not watched now and why (bucket -> words), for the header."""

    async def run(self) -> None:
        await asyncio.gather(*(self._watch(bucket, kind) for bucket, kind in _WATCHED), self._events())

    async def _watch(self, bucket: str, kind: str) -> None:
        apply = {"jobs": self.model.apply_job, "factories": self.model.apply_factory,
                 "pools": self.model.apply_pool, "control": self.model.apply_control}[kind]
        while True:
            try:
                reconnects = self.nc.stats["reconnects"]
                kv = await self.js.key_value(bucket)
                w = await kv.watchall()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # no bucket yet (no coordinator ever ran), or no broker now
                self.problems[bucket] = f"not watched: {e or type(e).__name__}"
                await asyncio.sleep(REWATCH_PAUSE_S)
                continue
            self.problems.pop(bucket, None)
            self.model.begin_replay(kind)
            try:
                while True:
                    if self.nc.stats["reconnects"] != reconnects:
                        # A broker restart drops the watch's ephemeral consumer and nats-py
                        # notices late: watch again (a replay, which drops what was deleted).
                        break
                    try:
                        e = await w.updates(timeout=1.0)
                    except (nats.errors.TimeoutError, asyncio.TimeoutError):
                        continue
                    while True:  # take what already arrived without a timed wait each
                        if e is None:
                            self.model.end_replay(kind)
                            self.synced[kind].set()
                        else:
                            deleted = e.operation in ("DEL", "PURGE")
                            apply(e.key, None if deleted else e.value, e.created.timestamp() if e.created else 0.0)
                        try:
                            e = w._updates.get_nowait()  # nats-py's queue behind updates()
                        except asyncio.QueueEmpty:
                            break
            except asyncio.CancelledError:
                raise
            except Exception as ex:
                self.problems[bucket] = f"watch failed: {ex}; watching again"
                await asyncio.sleep(REWATCH_PAUSE_S)
            finally:
                try:
                    await w.stop()
                except Exception:
                    pass

    async def _events(self) -> None:
        from nats.js import api

        while True:
            start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=self.model.window_s)
            try:
                sub = await self.js.subscribe(
                    f"{names.EVENTS_PREFIX}.>", stream=names.EVENTS_STREAM, ordered_consumer=True,
                    pending_msgs_limit=EVENTS_PENDING_MAX,
                    config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME,
                                              opt_start_time=start.isoformat()))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.problems[names.EVENTS_STREAM] = f"not followed: {e or type(e).__name__}"
                await asyncio.sleep(REWATCH_PAUSE_S)
                continue
            self.problems.pop(names.EVENTS_STREAM, None)
            try:
                while True:
                    try:
                        msg = await sub.next_msg(timeout=1.0)
                    except (nats.errors.TimeoutError, asyncio.TimeoutError):
                        continue
                    self.model.apply_event(msg.data)
            except asyncio.CancelledError:
                raise
            except Exception as ex:
                self.problems[names.EVENTS_STREAM] = f"consumer failed: {ex}; following again"
                await asyncio.sleep(REWATCH_PAUSE_S)
            finally:
                try:
                    await sub.unsubscribe()
                except Exception:
                    pass


# -- the widgets ---------------------------------------------------------------------------------

_STAGE_STYLE = {"shipped": "green", "failed": "red", "dead_letter": "bold red", "blocked": "yellow",
                "queued": "cyan", "building": "magenta"}


class TopApp(App):
    """The full-screen view. ``q`` quits.

    :param nc: a connected nats-py client; the app does not close it.
    :param url: shown in the title.
    :param refresh_s: the most often the screen is redrawn.
    :param events_max: the newest events kept and shown.
    :param throughput_window_s: ships per minute are averaged over this window.
    :param clock: the time the ages are measured to (seconds since the epoch).
    """

    TITLE = "gigafactory top"
    CSS = """
    #summary { height: auto; padding: 0 1; background: $boost; }
    #upper { height: auto; max-height: 16; }
    #stages { width: 26; height: auto; }
    #right { height: auto; }
    #pools { height: auto; max-height: 9; }
    #spend { height: auto; max-height: 7; }
    #factories { height: auto; max-height: 16; }
    #events { height: 1fr; }
    DataTable { border: round $primary-darken-2; }
    """
    BINDINGS = [("q", "quit", "Quit")]

    def __init__(self, nc, *, url: str = "", refresh_s: float = REFRESH_S_DEFAULT,
                 events_max: int = EVENTS_MAX_DEFAULT, throughput_window_s: float = THROUGHPUT_WINDOW_S_DEFAULT,
                 clock=time.time) -> None:
        super().__init__()
        self.nc = nc
        self.url = url
        self.refresh_s = refresh_s
        self.clock = clock
        self.model = TopModel(events_max=events_max, throughput_window_s=throughput_window_s)
        self.feed = Feed(nc, self.model)
        self.snapshot: Snapshot | None = None
        """What the widgets show now (tests read it next to the widgets)."""
        self._drawn = (-1, -1)

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        yield Static("connecting…", id="summary")
        with Horizontal(id="upper"):
            yield DataTable(id="stages", cursor_type="none", zebra_stripes=True)
            with Vertical(id="right"):
                yield DataTable(id="pools", cursor_type="none", zebra_stripes=True)
                yield DataTable(id="spend", cursor_type="none", zebra_stripes=True)
        yield DataTable(id="factories", cursor_type="none", zebra_stripes=True)
        yield DataTable(id="events", cursor_type="none", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.url
        cols = {
            "stages": ("stage", "jobs"),
            "spend": ("engine", "attempts", "cost_usd", "cost_source"),
            "pools": ("pool", "requirements", "depth", "oldest", "factories"),
            "factories": ("factory", "host", "live", "mode", "stations", "idle", "engines", "outbox",
                          "quarantined", "heartbeat"),
            "events": ("time", "kind", "job", "stage", "factory", "reason"),
        }
        for table_id, names_ in cols.items():
            t = self.query_one(f"#{table_id}", DataTable)
            for c in names_:
                t.add_column(c, key=c)
        self.query_one("#stages", DataTable).border_title = "jobs by stage"
        self.query_one("#spend", DataTable).border_title = "spend by engine"
        self.query_one("#pools", DataTable).border_title = "pools"
        self.query_one("#factories", DataTable).border_title = "factories"
        self.query_one("#events", DataTable).border_title = "latest events"
        self.feed_worker = self.run_worker(self.feed.run(), name="feed", exit_on_error=True)
        self.set_interval(self.refresh_s, self.redraw)
        self.redraw()

    def redraw(self) -> None:
        """Show the model's snapshot, if anything changed or a second passed (ages move)."""
        now = self.clock()
        key = (self.model.version, int(now))
        if key == self._drawn:
            return
        self._drawn = key
        snap = self.snapshot = self.model.snapshot(now)
        self._summary(snap)
        self._fill("stages", ((s, (_styled(s), str(n))) for s, n in snap.stages.items()))
        self._fill("spend", ((r.engine, (r.engine, str(r.attempts), f"{r.cost_usd:.4f}", r.sources or "-"))
                             for r in snap.spend))
        self._fill("pools", ((p.pool, (p.pool, p.requirements, str(p.depth), format_age(p.oldest_age_s),
                                       str(p.live_factories))) for p in snap.pools))
        self._fill("factories", ((f.factory, (f.factory, f.host, "yes" if f.live else "NO", f.mode,
                                              f"{f.busy}/{f.stations} busy", f.idle, f.engines, str(f.outbox),
                                              str(f.quarantined), format_age(f.heartbeat_age_s)))
                                 for f in snap.factories))
        self._fill("events", ((str(i), (_clock(e.at), e.kind, e.job, e.change, e.factory, e.reason[:80]))
                              for i, e in enumerate(snap.events)))

    def _summary(self, snap: Snapshot) -> None:
        synced = all(ev.is_set() for ev in self.feed.synced.values())
        parts = [f"{snap.jobs_total:,} jobs", f"{snap.ships_per_min:.1f} ships/min",
                 f"{snap.ships_seen:,} ships seen", f"${snap.spend_total_usd:.4f} spent",
                 f"{sum(1 for f in snap.factories if f.live)}/{len(snap.factories)} factories live"]
        if not synced:
            parts.append("loading…")
        if snap.unreadable:
            parts.append(f"{snap.unreadable} unreadable entries")
        text = Text("  ·  ".join(parts))
        if snap.halt:  # the kill switch first: an operator must not miss it
            text = Text(f"HALTED: {snap.halt}  ·  ", style="bold red") + text
        for what, why in sorted(self.feed.problems.items()):  # Text, not markup: errors hold brackets
            text.append(f"\n{what}: {why}", style="yellow")
        self.query_one("#summary", Static).update(text)

    def _fill(self, table_id: str, rows) -> None:
        t = self.query_one(f"#{table_id}", DataTable)
        t.clear()
        for key, cells in rows:
            # Text, not markup: a reason or a job name with brackets is shown as it is.
            t.add_row(*(c if isinstance(c, Text) else Text(c) for c in cells), key=key)


def _styled(stage: str) -> Text:
    return Text(stage, style=_STAGE_STYLE.get(stage, ""))


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "-"

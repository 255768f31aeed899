"""Local durable outbox and quarantine: real SQLite files, real processes, real SIGKILL."""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from gigafactory.factory.outbox import Outbox, OutboxItem


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(str(tmp_path / "box"))
    yield box
    box.close()


def test_new_outbox_creates_database_and_quarantine_folder(tmp_path):
    directory = tmp_path / "fresh" / "nested"
    with Outbox(str(directory)) as box:
        assert box.count() == 0
        assert box.pending() == []
        assert box.quarantined() == []
    assert (directory / "outbox.sqlite3").is_file()
    assert (directory / "quarantine").is_dir()


def test_database_uses_wal(outbox):
    conn = sqlite3.connect(outbox.db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_put_then_pending_oldest_first_with_all_fields(outbox):
    before = time.time()
    first = outbox.put("event", "job-a", 1, b'{"stage": "building"}')
    second = outbox.put("result", "job-b", 4, b"\x00\xffbinary")
    assert second > first
    items = outbox.pending()
    assert [i.id for i in items] == [first, second]
    a, b = items
    assert (a.kind, a.job, a.epoch, a.payload, a.attempts) == ("event", "job-a", 1, b'{"stage": "building"}', 0)
    assert (b.kind, b.job, b.epoch, b.payload) == ("result", "job-b", 4, b"\x00\xffbinary")
    assert before <= a.created_at <= time.time()
    assert outbox.count() == 2


def test_pending_respects_limit(outbox):
    ids = [outbox.put("event", "job", 1, str(n).encode()) for n in range(5)]
    assert [i.id for i in outbox.pending(limit=2)] == ids[:2]
    with pytest.raises(ValueError, match="limit"):
        outbox.pending(limit=0)


def test_mark_done_removes_only_that_item(outbox):
    a = outbox.put("event", "job", 1, b"a")
    b = outbox.put("event", "job", 1, b"b")
    outbox.mark_done(a)
    assert [i.id for i in outbox.pending()] == [b]
    assert outbox.count() == 1
    outbox.mark_done(a)  # twice is harmless
    assert outbox.count() == 1


def test_mark_attempt_increments(outbox):
    a = outbox.put("event", "job", 1, b"a")
    b = outbox.put("event", "job", 1, b"b")
    outbox.mark_attempt(a)
    outbox.mark_attempt(a)
    attempts = {i.id: i.attempts for i in outbox.pending()}
    assert attempts == {a: 2, b: 0}


@pytest.mark.parametrize(
    ("kind", "job", "epoch", "payload", "error"),
    [
        ("", "job", 1, b"x", ValueError),
        ("event", "", 1, b"x", ValueError),
        ("event", "job", -1, b"x", ValueError),
        ("event", "job", "1", b"x", ValueError),
        ("event", "job", 1, "text, not bytes", TypeError),
    ],
)
def test_put_refuses_invalid_items(outbox, kind, job, epoch, payload, error):
    with pytest.raises(error):
        outbox.put(kind, job, epoch, payload)
    assert outbox.count() == 0


def test_items_survive_close_and_reopen(tmp_path):
    directory = str(tmp_path / "box")
    with Outbox(directory) as box:
        item_id = box.put("result", "job-1", 2, b'{"ok": true}')
    with Outbox(directory) as box:
        [item] = box.pending()
        assert (item.id, item.job, item.epoch, item.payload) == (item_id, "job-1", 2, b'{"ok": true}')


def test_closed_outbox_refuses_calls(tmp_path):
    box = Outbox(str(tmp_path / "box"))
    box.close()
    box.close()
    with pytest.raises(RuntimeError, match="closed"):
        box.put("event", "job", 1, b"x")


def test_quarantine_writes_folder_removes_pending_and_copies_log(outbox, tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(b"engine output\nverify output\n")
    keep = outbox.put("event", "other-job", 7, b"{}")
    outbox.put("result", "job-9", 3, b'{"outcome": "passed", "commits": 2}')
    item = [i for i in outbox.pending() if i.job == "job-9"][0]

    folder = outbox.quarantine(item, "stale epoch 3: job is at epoch 4", log_path=str(log))

    assert os.path.basename(folder) == f"job-9-epoch-3-{item.id}"
    assert os.path.dirname(folder) == outbox.quarantine_dir
    with open(os.path.join(folder, "result.json")) as f:
        record = json.load(f)
    assert record["kind"] == "result" and record["job"] == "job-9" and record["epoch"] == 3
    assert record["reason"] == "stale epoch 3: job is at epoch 4"
    assert record["created_at"] == item.created_at
    assert record["payload"] == {"outcome": "passed", "commits": 2}
    assert record["payload_encoding"] == "json"
    with open(os.path.join(folder, record["log"]), "rb") as f:
        assert f.read() == log.read_bytes()
    assert [i.id for i in outbox.pending()] == [keep]
    assert outbox.quarantined() == [record]
    assert not [n for n in os.listdir(outbox.quarantine_dir) if n.startswith(".")]


def test_quarantine_binary_payload_is_base64(outbox):
    payload = b"\x89PNG\x00\xff not json"
    outbox.put("result", "job-bin", 1, payload)
    [item] = outbox.pending()
    outbox.quarantine(item, "stale")
    [record] = outbox.quarantined()
    assert record["payload_encoding"] == "base64"
    assert base64.b64decode(record["payload"]) == payload
    assert record["log"] is None


def test_quarantine_with_missing_log_keeps_the_result_and_says_why(outbox, tmp_path):
    outbox.put("result", "job-x", 1, b"{}")
    [item] = outbox.pending()
    folder = outbox.quarantine(item, "stale", log_path=str(tmp_path / "gone.log"))
    [record] = outbox.quarantined()
    assert record["log"] is None and "gone.log" in record["log_error"]
    assert os.listdir(folder) == ["result.json"]
    assert outbox.count() == 0


def test_quarantine_twice_is_harmless(outbox):
    outbox.put("result", "job-twice", 5, b'"v1"')
    [item] = outbox.pending()
    first = outbox.quarantine(item, "first reason")
    second = outbox.quarantine(item, "second reason")
    assert first == second
    [record] = outbox.quarantined()
    assert record["reason"] == "first reason"  # the complete first record is not overwritten


def test_quarantine_folder_name_is_one_safe_path_component(outbox):
    outbox.put("result", "../../etc/passwd", 2, b"{}")
    [item] = outbox.pending()
    folder = outbox.quarantine(item, "stale")
    assert os.path.dirname(folder) == outbox.quarantine_dir
    assert "/" not in os.path.basename(folder) and not os.path.basename(folder).startswith(".")
    assert outbox.quarantined()[0]["job"] == "../../etc/passwd"


def test_quarantine_needs_a_reason(outbox):
    outbox.put("result", "job", 1, b"{}")
    [item] = outbox.pending()
    with pytest.raises(ValueError, match="reason"):
        outbox.quarantine(item, "")
    assert outbox.count() == 1 and outbox.quarantined() == []


def test_quarantine_failure_leaves_no_half_written_folder_and_keeps_the_item(outbox):
    outbox.put("result", "job-fail", 1, b"{}")
    [item] = outbox.pending()
    # A plain file squatting on the folder name makes the final rename fail after the
    # temporary folder was fully written: the failure must not leave that folder behind.
    squatter = os.path.join(outbox.quarantine_dir, f"job-fail-epoch-1-{item.id}")
    with open(squatter, "w") as f:
        f.write("not a folder")
    with pytest.raises(OSError):
        outbox.quarantine(item, "stale")
    assert outbox.count() == 1  # still pending: nothing was lost
    assert os.listdir(outbox.quarantine_dir) == [os.path.basename(squatter)]
    assert outbox.quarantined() == []


def test_abandoned_temp_folders_of_dead_processes_are_removed_on_open(tmp_path):
    directory = tmp_path / "box"
    Outbox(str(directory)).close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead_pid = int(dead.stdout)
    abandoned = directory / "quarantine" / f".tmp-{dead_pid}-abcd1234"
    abandoned.mkdir()
    (abandoned / "result.json").write_text("{half")
    mine = directory / "quarantine" / f".tmp-{os.getpid()}-abcd1234"
    mine.mkdir()
    with Outbox(str(directory)) as box:
        assert not abandoned.exists()
        assert mine.exists()  # a live process may be writing it
        assert box.quarantined() == []


_CHILD = textwrap.dedent(
    """
    import sys
    from gigafactory.factory.outbox import Outbox
    box = Outbox(sys.argv[1])
    n = 0
    while True:
        item_id = box.put("event", "job-crash", 1, b'{"n": %d}' % n)
        # Printed only after put returned: every id printed was acknowledged as durable.
        print(item_id, flush=True)
        n += 1
    """
)


def _read_ids(proc: subprocess.Popen, want: int, timeout_s: float) -> list[int]:
    ids: list[int] = []
    buf = b""
    deadline = time.monotonic() + timeout_s
    fd = proc.stdout.fileno()
    while len(ids) < want and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        ids.extend(int(line) for line in lines if line)
    return ids


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_acknowledged_items_survive_sigkill_of_the_writer(tmp_path):
    directory = str(tmp_path / "box")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, directory], stdout=subprocess.PIPE)
    try:
        acknowledged = _read_ids(proc, want=50, timeout_s=10)
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-write: it is in a put loop
        proc.wait(timeout=5)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 50

    with Outbox(directory) as box:
        stored = {i.id: i for i in box.pending(limit=10_000)}
        assert set(acknowledged) <= set(stored)
        assert all(stored[i].job == "job-crash" and stored[i].payload.startswith(b'{"n": ') for i in acknowledged)
    conn = sqlite3.connect(os.path.join(directory, "outbox.sqlite3"))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


_WRITER = textwrap.dedent(
    """
    import sys
    from gigafactory.factory.outbox import Outbox
    with Outbox(sys.argv[1]) as box:
        print("open", flush=True)
        for n in range(int(sys.argv[2])):
            box.put("event", "from-child", 1, b"%d" % n)
    print("done", flush=True)
    """
)


@pytest.mark.skipif(os.name != "posix", reason="select() on a pipe")
def test_two_processes_writing_the_same_outbox_lose_nothing(tmp_path):
    directory = str(tmp_path / "box")
    per_writer = 300
    with Outbox(directory) as box:
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, directory, str(per_writer)], stdout=subprocess.PIPE)
        try:
            # Start writing once the child has the database open, so the two overlap.
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            assert ready and proc.stdout.readline() == b"open\n"
            mine = [box.put("event", "from-parent", 1, b"%d" % n) for n in range(per_writer)]
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        assert proc.returncode == 0 and out.strip() == b"done"
        items = box.pending(limit=10_000)
        assert len(items) == box.count() == 2 * per_writer
        assert len({i.id for i in items}) == 2 * per_writer
        assert set(mine) <= {i.id for i in items}
        child_payloads = sorted(int(i.payload) for i in items if i.job == "from-child")
        assert child_payloads == list(range(per_writer))


def test_outbox_item_is_immutable():
    item = OutboxItem(id=1, kind="event", job="j", epoch=1, payload=b"", created_at=0.0, attempts=0)
    with pytest.raises(AttributeError):
        item.attempts = 2  # type: ignore[misc]

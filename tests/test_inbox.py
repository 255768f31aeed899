"""The inbox folder on a real broker: a retried scan never creates a job twice, one bad file
never jams the others, and a failure that passes is retried with back-off, not in a loop."""

from __future__ import annotations


import pytest
from helpers import Fleet, eventually, fast_settings, run

from gigafactory.coordinator import inbox as inbox_mod
from gigafactory.coordinator import intake
from gigafactory.coordinator.inbox import Inbox

pytestmark = pytest.mark.timeout(120)

UNOBTAINABLE = ["has:unobtainium"]


async def _jobs(fleet: Fleet) -> int:
    return len(await fleet.admin.jobs.keys())


async def _scan_until_stable(inbox: Inbox) -> int:
    """Scan twice: a file is picked up once it looked the same on two scans."""
    return await inbox.scan() + await inbox.scan()


def test_a_2mb_body_among_three_small_files_gives_three_jobs_in_four_scans(nats_server, tmp_path):
    """The reported case: on main the big file's failed write left all four files in place and
    every scan made the three small jobs again (12 jobs in four scans)."""

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            d = tmp_path / "inbox"
            inbox = Inbox(fleet.admin, d)
            for name in ("a.md", "b.md", "c.md"):
                (d / name).write_text(fleet.job(f"echo {name}", capabilities=UNOBTAINABLE))
            (d / "big.md").write_text(fleet.job("echo big\n" + "#" * (2 << 20), capabilities=UNOBTAINABLE))
            for _ in range(4):
                try:  # as the coordinator's loop runs it: an error is logged, the next round comes
                    await inbox.scan()
                except Exception:
                    pass
            assert await _jobs(fleet) == 3
            assert sorted(p.name for p in (d / ".submitted").glob("*.md")) == ["a.md", "b.md", "c.md"]
            assert (d / ".rejected" / "big.md").exists()
            error = (d / ".rejected" / "big.md.error.txt").read_text()
            assert "big.md" in error and "max_job_file_bytes" in error and "GIGAFACTORY_MAX_JOB_FILE_BYTES" in error
            assert list(d.glob("*.md")) == []

    run(main())


def test_a_half_written_batch_is_finished_on_retry_without_a_second_job(nats_server, tmp_path):
    """The audit stream is deleted, so the first wave's records are written and their events
    fail: the batch stops half-written. Once the stream is back, the retry finds the jobs it
    wrote and writes the rest: five files, five jobs."""

    async def main():
        settings = fast_settings(inbox_retry_max_s=0.2)
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            d = tmp_path / "inbox"
            inbox = Inbox(fleet.admin, d)
            for name in ("x.md", "y.md", "z.md"):
                (d / name).write_text(fleet.job(f"echo {name}", capabilities=UNOBTAINABLE))
            (d / "lib.md").write_text(fleet.job("echo lib", idempotency_key="lib", capabilities=UNOBTAINABLE))
            (d / "app.md").write_text(fleet.job("echo app", deps=["lib"], capabilities=UNOBTAINABLE))
            await fleet.admin.js.delete_stream("GF_EVENTS")

            assert await _scan_until_stable(inbox) == 0
            written = await _jobs(fleet)
            assert 1 <= written < 5, "the batch stopped half-written"
            assert inbox.failed_batches == 1
            assert len(list(d.glob("*.md"))) == 5, "every file stays for the retry"
            # Backing off, not looping: scans during the pause do not try again.
            for _ in range(20):
                assert await inbox.scan() == 0
            assert inbox.failed_batches == 1

            await fleet.admin.ensure_layout()  # the audit stream is back
            await eventually(inbox.scan, 10, what="the inbox retries after its back-off")
            assert list(d.glob("*.md")) == []
            assert await _jobs(fleet) == 5
            done = d / ".submitted"
            ids = {p.name: (done / f"{p.name}.job").read_text().strip() for p in done.glob("*.md")}
            assert len(set(ids.values())) == 5
            rec, _ = await fleet.record(ids["app.md"])
            assert rec.deps == [ids["lib.md"]]
            # The audit has each job's submission once: the retry filled the events the first try
            # lost, and a third submission of the same files adds none.
            for job in ids.values():
                assert [e["kind"] for e in await fleet.events(job)].count("submitted") == 1, job
            files = [(str(d / n), (done / n).read_text()) for n in ("lib.md",)]
            [again] = await intake.submit(fleet.admin, files)
            assert again.status == "existing"
            assert [e["kind"] for e in await fleet.events(ids["lib.md"])].count("submitted") == 1

    run(main())


def test_a_scan_after_a_crash_between_submitting_and_moving_finds_the_jobs(nats_server, tmp_path):
    """The coordinator died after intake wrote the jobs and before the files moved: the next
    scan submits the same files, as the same identities, and gets the same jobs back."""

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            d = tmp_path / "inbox"
            inbox = Inbox(fleet.admin, d)
            paths = []
            for name in ("one.md", "two.md"):
                (d / name).write_text(fleet.job(f"echo {name}", capabilities=UNOBTAINABLE))
                paths.append(d / name)
            idents = []
            for p in paths:
                st = p.stat()
                idents.append(intake.file_identity(p.name, p.read_bytes(), st.st_size, st.st_mtime_ns))
            first = await intake.submit(fleet.admin, [(str(p), p.read_text()) for p in paths], source="inbox",
                                        identities=idents)
            assert await _scan_until_stable(inbox) == 2
            assert await _jobs(fleet) == 2
            assert [(d / ".submitted" / f"{p.name}.job").read_text().strip() for p in paths] == [r.job for r in first]

            # The same content dropped again later is a new drop, and a new job.
            (d / "one.md").write_text(fleet.job("echo one.md", capabilities=UNOBTAINABLE))
            assert await _scan_until_stable(inbox) == 1
            assert await _jobs(fleet) == 3

    run(main())


def test_one_bad_file_does_not_jam_the_inbox(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            d = tmp_path / "inbox"
            inbox = Inbox(fleet.admin, d)
            (d / "deep.md").write_text("---\nengine: shell\ncwd: x\nnest: " + "[" * 500 + "]" * 500 + "\n---\necho\n")
            (d / "chain.md").write_text(fleet.job("echo ok", capabilities=UNOBTAINABLE))
            assert await _scan_until_stable(inbox) == 1
            error = (d / ".rejected" / "deep.md.error.txt").read_text()
            assert "deep.md:4" in error and "nested more than 16 levels" in error and "max_manifest_depth" in error
            assert (d / ".submitted" / "chain.md").exists()

    run(main())


def test_a_drop_larger_than_a_batch_is_submitted_over_several_scans(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(max_batch_files=3)) as fleet:
            d = tmp_path / "inbox"
            inbox = Inbox(fleet.admin, d)
            for i in range(5):
                (d / f"f{i}.md").write_text(fleet.job(f"echo {i}", capabilities=UNOBTAINABLE))
            assert await _scan_until_stable(inbox) == 3
            assert await inbox.scan() == 2
            assert list((d / ".rejected").iterdir()) == []
            assert await _jobs(fleet) == 5

    run(main())


def test_files_tried_one_at_a_time_go_after_the_files_they_depend_on(tmp_path):
    def item(name: str, **manifest) -> tuple:
        from helpers import job_text

        return (tmp_path / name, job_text("echo", cwd="x", **manifest), name)

    items = [item("a.md", deps=["k-c"]), item("b.md", idempotency_key="k-b"),
             item("c.md", idempotency_key="k-c", deps=["k-b"]), item("d.md", idempotency_key="k-d", deps=["k-e"]),
             item("e.md", idempotency_key="k-e", deps=["k-d"]), item("bad.md")]
    items[-1] = (tmp_path / "bad.md", "no front matter", "bad.md")

    order = [p.name for p, _, _ in inbox_mod._dependency_order(items)]

    assert sorted(order) == sorted(p.name for p, _, _ in items)
    assert order.index("b.md") < order.index("c.md") < order.index("a.md")
    assert {"d.md", "e.md"} <= set(order)  # a cycle is cut, not looped on


def test_a_file_that_keeps_failing_unexpectedly_is_isolated_then_rejected_with_its_error(nats_server, tmp_path):
    """A real refusal intake does not foresee: the dispatch stream takes one consumer only, so
    the file needing a new pool fails every time. The batch is split, the good file goes
    through, and the bad one is rejected after inbox_max_failures tries, with the error."""
    from nats.js import api

    async def main():
        settings = fast_settings(inbox_max_failures=2, inbox_retry_max_s=0.05)
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            await fleet.admin.js.delete_stream("GF_DISPATCH")
            await fleet.admin.js.add_stream(api.StreamConfig(
                name="GF_DISPATCH", subjects=["gf.dispatch.>"], retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE, max_consumers=1))
            await fleet.submit(fleet.job("echo first", capabilities=UNOBTAINABLE))  # the one consumer
            d = tmp_path / "inbox"
            inbox = Inbox(fleet.admin, d)
            (d / "good.md").write_text(fleet.job("echo good", capabilities=UNOBTAINABLE))
            (d / "bad.md").write_text(fleet.job("echo bad", capabilities=["has:another-pool"]))

            async def settled():
                await inbox.scan()
                return not list(d.glob("*.md"))

            await eventually(settled, 20, what="both files leave the inbox")
            assert (d / ".submitted" / "good.md").exists()
            error = (d / ".rejected" / "bad.md.error.txt").read_text()
            assert "could not be submitted (2 attempts" in error and "inbox_max_failures = 2" in error
            assert "maximum consumers" in error.lower()
            assert await _jobs(fleet) == 2

    run(main())

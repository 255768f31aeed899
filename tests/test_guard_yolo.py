"""yolo only where the profile permits it (issue 12, "Engine sandbox"): refused at intake."""

from __future__ import annotations

import pytest
from helpers import Fleet, fast_settings, run

from gigafactory.client import ApiError
from gigafactory.schemas import profiles
from gigafactory.schemas.manifest import ManifestError, parse_job_text

pytestmark = pytest.mark.timeout(60)

CATALOG = {
    "strict": profiles.parse_profile("---\nsummary: s\nengine-class: agentic-coder\n---\nYou are careful.\n",
                                     "strict.md"),
    "trusted": profiles.parse_profile("---\nsummary: t\nengine-class: agentic-coder\nyolo: true\n---\nGo.\n",
                                      "trusted.md"),
}


def _job(front: str) -> str:
    return f"---\n{front}cwd: r\n---\nDo the task.\n"


def test_yolo_under_a_profile_that_does_not_permit_it_is_refused_naming_the_field():
    with pytest.raises(ManifestError) as e:
        profiles.resolve(parse_job_text(_job("profile: strict\nyolo: true\n"), "j.md"), CATALOG)
    assert e.value.field == "yolo" and "does not permit yolo" in str(e.value) and "j.md" in str(e.value)
    assert profiles.resolve(parse_job_text(_job("profile: trusted\nyolo: true\n"), "j.md"), CATALOG).manifest.yolo
    assert not profiles.resolve(parse_job_text(_job("profile: strict\n"), "j.md"), CATALOG).manifest.yolo


def test_no_shipped_profile_permits_yolo():
    assert not [p.name for p in profiles.load_catalog().values() if p.fields.yolo]


def test_intake_refuses_a_yolo_job_of_a_profile_without_it_and_takes_one_with_it(nats_server, tmp_path):
    pdir = tmp_path / "profiles"
    pdir.mkdir()
    (pdir / "trusted.md").write_text("---\nsummary: t\nengine-class: agentic-coder\nyolo: true\n---\nGo.\n")

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(profiles_dir=str(pdir))) as fleet:
            with pytest.raises(ApiError) as e:
                await fleet.submit_one(_job("profile: developer\nyolo: true\n"), "dev.md")
            assert "dev.md" in str(e.value) and "yolo" in str(e.value) and "developer" in str(e.value)
            job = await fleet.submit_one(_job("profile: trusted\nyolo: true\n"), "ok.md")
            rec, _ = await fleet.record(job)
            assert rec.manifest.yolo and str(rec.stage) == "queued"

    run(main())

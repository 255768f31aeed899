"""Take the README's screenshot of ``gigafactory top`` from a real run (not a test).

A real nats-server, the real coordinator and three factories (in-process, as the tests run
them), a mix of jobs (quick ones shipped, long ones running, one failing, a pool no factory
serves, a declared agent CLI that reports priced usage), then ``gigafactory top`` driven
headless and saved as SVG::

    python tests/top_screenshot.py docs/images/top.svg
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Fleet, eventually, fast_settings  # noqa: E402
from test_engines_declared import DECLARATION, FAKECLI  # noqa: E402

from gigafactory.broker import connect  # noqa: E402
from gigafactory.embedded import EmbeddedServer  # noqa: E402
from gigafactory.top import TopApp  # noqa: E402


async def scene(url: str, root: Path, out: Path) -> None:
    engines_dir = root / "engines"
    engines_dir.mkdir(parents=True)
    (engines_dir / "fakecli.yaml").write_text(yaml.safe_dump(DECLARATION, sort_keys=False))
    async with Fleet(url, root, fast_settings(engines_dir=str(engines_dir), lease_ttl_s=30.0, lease_renew_s=5.0, heartbeat_s=1.0)) as fleet:
        await fleet.add_factory("build-linux-1", stations=4, caps=["lang:python"])
        await fleet.add_factory("build-linux-2", stations=2, caps=["lang:python"])
        await fleet.add_factory("agent-box", stations=2, probe=True)
        gate = root / "gate"
        quick = [fleet.job(f"echo build {i}", capabilities=["lang:python"], review_policy="auto") for i in range(14)]
        await fleet.submit(*quick)
        await fleet.submit(*(fleet.job("Create hello.txt.", engine="fakecli", review_policy="auto")
                             for _ in range(3)))
        await fleet.submit(fleet.job("echo flaky; exit 3", capabilities=["lang:python"], retry={"max": 0}))
        await fleet.submit(*(fleet.job(f'while [ ! -e "{gate}" ]; do sleep 0.2; done',
                                       capabilities=["lang:python"], review_policy="auto") for _ in range(5)))
        await fleet.submit(*(fleet.job("nvidia-smi", capabilities=["gpu:a100"]) for _ in range(3)))

        nc = await connect(url, "top-screenshot", fleet.settings)
        app = TopApp(nc, url=url, refresh_s=0.2)
        try:
            async with app.run_test(size=(150, 46)) as pilot:
                def settled():
                    s = app.snapshot
                    return s and s.stages["shipped"] >= 16 and s.stages["building"] >= 5 and s.spend
                await eventually(settled, 120, what="the scene in place")
                await pilot.pause(1.5)
                app.save_screenshot(filename=out.name, path=str(out.parent))
                await pilot.press("q")
        finally:
            gate.touch()
            await nc.close()


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "top.svg").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        exe = bin_dir / "fakecli"
        exe.write_text(FAKECLI.replace("{python}", sys.executable))
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        os.environ["FAKECLI_API_KEY"] = "sk-fake"
        srv = EmbeddedServer(store_dir=str(root / "store"), log_file=str(root / "nats.log")).start()
        try:
            asyncio.run(scene(srv.url, root / "fleet", out))
        finally:
            srv.stop()
    print(out)


if __name__ == "__main__":
    main()

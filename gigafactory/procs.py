"""Process helpers shared by the CLI, the factory and the tests."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (a zombie still answers
    ``kill(pid, 0)``, but it is dead for every purpose here). Off POSIX: assume alive."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc/self"):
        return True  # no /proc (macOS): kill(0) said it exists
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False  # gone between the two looks
    except (OSError, IndexError):
        return True

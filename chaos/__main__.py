"""``python -m gigafactory.chaos``: the same as ``gigafactory chaos``."""

from gigafactory.chaos.cli import chaos

chaos(prog_name="python -m gigafactory.chaos")

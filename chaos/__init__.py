"""Chaos: fault scenarios, injectors, the invariant checker and the deterministic simulation.

Modules, each importing only those listed before it (``tests/test_layout.py`` checks there is no
cycle): :mod:`invariants` (the one checker, pure), :mod:`proxy` (the fault-injecting TCP proxy,
also run as ``python -m gigafactory.chaos.proxy``), :mod:`sim` (the deterministic simulation),
:mod:`harness` (the lab: real processes on loopback, and the ``@scenario`` decorator),
:mod:`cluster_lab` (the lab on a three-node cluster), :mod:`scenarios` (one file per scenario),
:mod:`runner` (the registry and the time limit around one run), :mod:`cli` (``gigafactory chaos``).
"""

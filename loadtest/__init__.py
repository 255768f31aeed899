"""The load suite: fleet-scale workloads against a baseline measured in the same run.

Modules, each importing only those listed before it (``tests/test_layout.py`` checks there is no
cycle): :mod:`stats` (pure figures), :mod:`fleet` (a fleet host: N factories in one process, run
as ``python -m gigafactory.loadtest.fleet``), :mod:`baseline` (the minimal CAS work queue, run as
``python -m gigafactory.loadtest.baseline``), :mod:`atleastonce` (the taskiq-style at-least-once
workers, run as ``python -m gigafactory.loadtest.atleastonce``), :mod:`harness` (one run's processes and
measurements), :mod:`workloads`, :mod:`runner` (a whole run, phase after phase), :mod:`cli`
(``gigafactory loadtest``).
"""

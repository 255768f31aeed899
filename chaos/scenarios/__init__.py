"""The real-process chaos scenarios (see ``harness.py`` for the lab they run in), one module
each; importing this package registers them all.

Each scenario has a bounded form (``ScenarioConfig.bounded``: what CI runs, well under a
minute on two cores) and a full form that applies its chaos for ``duration_s``. Each ends with
the one invariant check over the broker's records, and adds the claims of its own (reclaim
within the lease TTL plus a reaper interval, nothing left in an outbox, ...) as expectations.
"""

from . import broker_crash, churn, cluster, herd, outage, partition, pushpath, resume  # noqa: F401 (each registers its scenario)

"""The fleet as capital: where every dollar went (the spend ledger, funding windows, invoices),
what every station did when it was not working (idle classes), and how hard the fleet may run
(budgets from business signals, per-run caps, throughput per dollar).

Pure logic (attribution, window choice, reconciliation, budget formulas, idle accounting) sits
in modules without I/O, tested as tables; the broker and the SQLite database are read and
written by thin functions beside them. ``economics.cli`` holds the ``report`` and ``invoices``
commands.
"""

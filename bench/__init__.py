"""errand-boy's benchmarks: each figure against local ``subprocess`` in the same run.

Run ``python -m bench`` from the repository root (``--help`` for options).
Every figure starts a private server, measures errand-boy and its local
baseline interleaved, and the run prints a table of medians and ratios
against the targets and writes it as JSON (``bench/results/latest.json``).

Figures: ``roundtrip`` (descriptors and frames; from a bare socket; the
server without cgroups; and the floor, ``bench/floor.py``), ``concurrent16``,
``throughput``, ``capture``, ``concurrent1000`` (wall time and the server's
PSS peak), ``idle1000`` (PSS growth with 1000 connections open),
``memory``, ``bigclient``; see each function's docstring.
"""

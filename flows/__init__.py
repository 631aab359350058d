"""Prefect flows and the CLI wiring the stages.

Importing this package (the ``ovseg`` command does so first) sets ``GOMP_SPINCOUNT=10000`` unless the
environment sets it: GNU OpenMP, which torch's CPU kernels use, reads it once when torch loads, and its
default (300,000 spins of each idle worker thread after every parallel region) makes a machine shared
with other processes several times slower (a bank build of 200 tiny-model images beside two busy
processes: 52-94 s instead of 19 s; on a quiet machine the same as the default, 9.2-9.9 s; docs/design.md
"OpenMP on a shared machine"). The numbers computed do not change; child processes inherit it.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")

"""The HTTP service (and what the worker shares with it: contracts, preprocessing, the networks)."""

import os

# torch's OpenMP (libgomp) keeps idle threads spinning at every barrier by default. Where cores are shared
# (the server's own preprocessing threads, other processes) a spinning thread holds a core another one
# needs: under load, a 2-thread forward pass measured a median 700 ms spinning against 28 ms passive.
# Passive threads sleep instead. libgomp reads this once, when torch loads, so it is set here, before
# any module of ours imports torch; OMP_WAIT_POLICY=ACTIVE in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

"""The HTTP service (and what the worker shares with it: contracts, preprocessing, the networks)."""

import os
import sys

# torch's OpenMP (libgomp) keeps idle threads spinning at every barrier by default. Where cores are shared
# (the server's own preprocessing threads, other processes) a spinning thread holds a core another one
# needs: under load, a 2-thread forward pass measured a median 700 ms spinning against 28 ms passive.
# Passive threads sleep instead. libgomp reads this once, when torch loads, so it is set here, before
# any module of ours imports torch; OMP_WAIT_POLICY=ACTIVE in the environment wins.
WAIT_POLICY_GIVEN = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ  # by the user
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Spins at a barrier before a training thread sleeps (libgomp's GOMP_SPINCOUNT; its own default is 300,000).
TRAINING_SPIN_COUNT = 100_000


def spin_while_training() -> bool:
    """Call in a process that trains, before torch loads: its OpenMP threads then spin a while at each barrier
    instead of sleeping at once. A training step is hundreds of small operations back to back on threads that
    have the cores to themselves, and waking a sleeping thread for each cost resnet_s2_w32 a sixth of its time
    (2 AVX2 cores: 530-573 against 626-631 ms per view of 256; the default job 368 against 442 s). Bounded, the
    spin ends soon after the training does, so an idle worker holds no core. False (nothing changed) when the
    environment chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT) or torch is already loaded."""
    if WAIT_POLICY_GIVEN or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    os.environ["GOMP_SPINCOUNT"] = str(TRAINING_SPIN_COUNT)
    return True

import os

from tests.offline import block_network

# Ray reads this when imported; token auth stays on for the in-process test clusters too.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray Train's controller polls its workers every 2 s, so each of the suite's many tiny fits waited
# up to 2 s to notice its end; the test clusters' actors inherit this (0.5 s) from the driver.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# No test may touch the network: only this machine's servers (tests/offline.py).
block_network()

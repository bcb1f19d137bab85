import os

from tests.offline import block_network

# Ray reads this when imported; token auth stays on for the in-process test clusters too.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# No test may touch the network: only this machine's servers (tests/offline.py).
block_network()

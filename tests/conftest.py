import os

# Ray reads this when imported; token auth stays on for the in-process test clusters too.
os.environ.setdefault("RAY_AUTH_MODE", "token")

"""A fake Dataloop platform for tests: a real HTTP server on 127.0.0.1 that dtlpy talks to unmodified.

    server = FakeDataloopServer().start()
    connect_dtlpy(server.url)         # dtlpy's public API: add_environment, setenv, login_token
    project = server.state.add_project()
    ...                               # run dtlpy's own flows, then assert on server.state

tests/conftest.py wraps this in the `platform` fixture. docs/platform-tests.md lists what it implements.
"""
from __future__ import annotations

import time

from .server import FakeDataloopServer, FakeGate
from .state import PlatformState

TOKEN_EMAIL = "tester@example.com"


def offline_token(lifetime_s: int = 30 * 24 * 3600) -> str:
    """A JWT that dtlpy accepts offline: it only decodes it (unverified) for `exp` and `email`."""
    import jwt

    return jwt.encode({"email": TOKEN_EMAIL, "exp": int(time.time()) + lifetime_s, "iss": "fake-dataloop",
                       "sub": TOKEN_EMAIL}, "fake-dataloop-signing-key-not-a-secret-at-all", algorithm="HS256")


def connect_dtlpy(url: str) -> None:
    """Point dtlpy's client at `url` through its public API; nothing of dtlpy is patched."""
    import dtlpy as dl

    if url not in dl.client_api.environments:
        dl.add_environment(environment=url, alias=f"fake-{url.rsplit(':', 1)[-1]}")
    dl.setenv(url)
    dl.login_token(offline_token())


__all__ = ["FakeDataloopServer", "FakeGate", "PlatformState", "connect_dtlpy", "offline_token"]

"""A jupyter_server identity provider whose token is read from a file on every request.

Lets a test rotate a live server's token (as Kaggle rotates its proxy URL) while its kernels,
the supervisor's among them, keep running. Loaded by the server process through
``--ServerApp.identity_provider_class=tests.token_rotation.RotatingTokenIdentityProvider``.
"""

from __future__ import annotations

import os

from jupyter_server.auth.identity import IdentityProvider

TOKEN_FILE_ENV = "TETHER_TEST_TOKEN_FILE"
PROVIDER = "tests.token_rotation.RotatingTokenIdentityProvider"


class RotatingTokenIdentityProvider(IdentityProvider):  # type: ignore[misc]
    @property  # type: ignore[override]
    def token(self) -> str:
        with open(os.environ[TOKEN_FILE_ENV]) as handle:
            return handle.read().strip()

    @token.setter
    def token(self, value: str) -> None:
        pass  # JUPYTER_TOKEN and config are ignored: the file is the only token

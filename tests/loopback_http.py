"""httpx2's one-shot functions for the tests' plain-http calls to loopback servers.

``httpx2.get(url)`` builds a client, and with it a TLS context that loads the system's CA
store: ~20 ms of CPU per call, for connections that never use TLS. Polled in a loop while an
MCP or Jupyter server starts, that was a large share of the suite's CPU. These take a context
with no trust anchors instead (free to build; any TLS peer would be refused).
"""

from __future__ import annotations

import functools
import ssl

import httpx2

NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

get = functools.partial(httpx2.get, verify=NO_TLS)
post = functools.partial(httpx2.post, verify=NO_TLS)
request = functools.partial(httpx2.request, verify=NO_TLS)
stream = functools.partial(httpx2.stream, verify=NO_TLS)

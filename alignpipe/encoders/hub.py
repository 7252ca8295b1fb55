"""Failing fast without a network.

huggingface_hub retries each file it cannot reach five times with backoff (1+2+4+8+8 s), and a
model load asks for several files: an unreachable hub cost minutes before the error. Inside
`fail_fast`, the first request the hub libraries make triggers one TCP probe of the endpoint (at
most `PROBE_TIMEOUT_S`, once per process); when it fails, every hub request fails at once, as
under ``HF_HUB_OFFLINE=1``, so files already in the local cache still load and anything else is
the usual "cannot load weights" message within seconds. Loads from local paths never probe.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
_REACHABLE: dict[str, str | None] = {}  # endpoint -> why it is unusable; None: it answered
_LOCK = threading.Lock()


def _target(endpoint: str) -> tuple[str, int]:
    """(host, port) a request to `endpoint` connects to first: its proxy, if one applies."""
    url = urlsplit(endpoint)
    host = url.hostname or ""
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxied.hostname or "", proxied.port or 80
    return host, url.port or (443 if url.scheme == "https" else 80)


def _probe(endpoint: str, timeout: float) -> str | None:
    host, port = _target(endpoint)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{endpoint} is unreachable ({err.strerror or err})")

    # A thread, because name resolution ignores the socket timeout.
    thread = threading.Thread(target=connect, name="alignpipe-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"{endpoint} did not answer within {timeout:.0f} s"


def hub_problem() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it answers."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    with _LOCK:
        if endpoint not in _REACHABLE:
            _REACHABLE[endpoint] = _probe(endpoint, PROBE_TIMEOUT_S)
        return _REACHABLE[endpoint]


def known_problem() -> str | None:
    """What `hub_problem` found, without probing (for error messages)."""
    from huggingface_hub import constants

    found = _REACHABLE.get(constants.ENDPOINT)
    return found or ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None)


@contextmanager
def fail_fast() -> Iterator[None]:
    """Hub requests made inside fail at once (cache still used) when the hub is unreachable.

    huggingface_hub asks ``constants.is_offline_mode()`` before every request it sends; the
    first call inside probes the endpoint, and an unreachable hub switches offline mode on
    until the block ends.
    """
    from huggingface_hub import constants

    original, was_offline = constants.is_offline_mode, constants.HF_HUB_OFFLINE

    def offline() -> bool:
        if original():
            return True
        if hub_problem() is None:
            return False
        constants.HF_HUB_OFFLINE = True  # transformers' own checks then stay in the cache too
        return True

    constants.is_offline_mode = offline
    try:
        yield
    finally:
        constants.is_offline_mode = original
        constants.HF_HUB_OFFLINE = was_offline

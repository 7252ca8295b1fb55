"""Failing fast without a network.

huggingface_hub retries each file it cannot reach five times with backoff (1+2+4+8+8 s), and a
model load asks for several files: an unreachable hub cost minutes before the error. While a
`fail_fast` block runs (in any thread), the first request the hub libraries send triggers one TCP
probe of the endpoint (at most `PROBE_TIMEOUT_S`, once per process); when it fails, every hub
request fails at once, as under ``HF_HUB_OFFLINE=1``, so files already in the local cache still
load and anything else is the usual "cannot load weights" message within seconds. Loads from
local paths never probe.

How: huggingface_hub asks ``constants.is_offline_mode()`` before every request it sends, and
transformers asks ``is_offline_mode()`` (imported by value, so a module first imported during a
load keeps whatever function was installed then) before it looks anything up. One wrapper is
installed for the life of the process and never swapped back: outside a block it is the original
function, inside it also answers the probe's verdict. Neither ``HF_HUB_OFFLINE`` nor anything
else is saved and restored, so loads in several threads, or one after another, behave as the
first load of a fresh process.
"""

from __future__ import annotations

import socket
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
_REACHABLE: dict[str, str | None] = {}  # endpoint -> why it is unusable; None: it answered
_LOCK = threading.Lock()  # the probe cache
_STATE_LOCK = threading.Lock()  # _ACTIVE and the installed wrapper
_ACTIVE = 0  # fail_fast blocks running now, in all threads
_INNER: Callable[[], bool] | None = None  # huggingface_hub's own is_offline_mode


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

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _REACHABLE.get(constants.ENDPOINT)


def _is_offline_mode() -> bool:
    """``huggingface_hub.constants.is_offline_mode``, failing fast inside `fail_fast`.

    Only huggingface_hub's own asking (right before it sends a request) may probe; transformers
    also asks before it opens a local folder, and is told only what a probe already found.
    """
    if _INNER is not None and _INNER():
        return True
    if not _ACTIVE:
        return False
    caller = sys._getframe(1).f_globals.get("__name__") or ""
    if caller == "huggingface_hub" or caller.startswith("huggingface_hub."):
        return hub_problem() is not None
    return known_problem() is not None


def _install() -> None:
    """Put `_is_offline_mode` in place of huggingface_hub's, once; left there for good."""
    global _INNER
    from huggingface_hub import constants

    with _STATE_LOCK:
        current = constants.is_offline_mode
        if current is _is_offline_mode:
            return
        if _INNER is None:
            _INNER = current
        if current is _INNER:  # someone else's replacement is theirs to keep
            constants.is_offline_mode = _is_offline_mode


@contextmanager
def fail_fast() -> Iterator[None]:
    """Hub requests made while any such block runs fail at once (cache still used) when the
    hub is unreachable. Safe to enter from several threads at once and to nest."""
    global _ACTIVE
    _install()
    with _STATE_LOCK:
        _ACTIVE += 1
    try:
        yield
    finally:
        with _STATE_LOCK:
            _ACTIVE -= 1

"""Is a model server reachable? Answered in well under a second, so that an offline machine
falls back to its caches at once instead of waiting for download retries to time out.

The probe resolves the server's name and opens a TCP connection to it (or to the HTTPS proxy
that the environment configures for it) with a short deadline; nothing is sent. Answers are
remembered for a short while, so loading a bag of several models probes once.
"""
import socket
import threading
import time
import typing as tp
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

PROBE_TIMEOUT = 0.5  # seconds for name resolution and connection together
_REMEMBER_FOR = 30.0  # seconds an answer is reused
_answers: tp.Dict[tp.Tuple[str, int], tp.Tuple[float, tp.Optional[str]]] = {}


def _probe_target(url: str) -> tp.Tuple[str, int]:
    """Host and port a request to `url` would first connect to (the proxy, if one is set)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxy = getproxies().get(parts.scheme)
    if proxy and not proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or "", proxy_parts.port or 80
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def _resolve(host: str, port: int, deadline: float) -> tp.List[tuple]:
    """`getaddrinfo` with a deadline (it has none of its own: a dead resolver can block for
    many seconds), run in a daemon thread that is abandoned when the deadline passes."""
    result: tp.List[tp.Any] = []

    def resolve() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as error:
            result.append(error)

    thread = threading.Thread(target=resolve, daemon=True, name="demucs-resolve")
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not result:
        raise TimeoutError(f"resolving {host} took more than {PROBE_TIMEOUT} s")
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def _connect(host: str, port: int) -> None:
    deadline = time.monotonic() + PROBE_TIMEOUT
    addresses = _resolve(host, port, deadline)
    error: OSError = ConnectionError(f"no address for {host}")
    for family, kind, proto, _, address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"connecting to {host}:{port} took more than {PROBE_TIMEOUT} s")
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(remaining)
                sock.connect(address)
            return
        except OSError as exc:
            error = exc
    raise error


def unreachable_reason(url: str) -> tp.Optional[str]:
    """None when the server of `url` accepts connections, else why not (e.g. "cannot resolve
    huggingface.co"); takes at most `PROBE_TIMEOUT` seconds."""
    target = _probe_target(url)
    now = time.monotonic()
    remembered = _answers.get(target)
    if remembered is not None and now - remembered[0] < _REMEMBER_FOR:
        return remembered[1]
    try:
        _connect(*target)
        reason = None
    except socket.gaierror as error:
        reason = f"cannot resolve {target[0]} ({error.strerror or error})"
    except OSError as error:
        reason = f"cannot connect to {target[0]}:{target[1]} ({error})"
    _answers[target] = (now, reason)
    return reason

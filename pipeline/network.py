"""Ports and HTTP probes on this machine: a free port, a port that must be free, a server that answers."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from pipeline.errors import PipelineError


class PortTaken(PipelineError):
    """A server cannot bind its port: something else holds it."""


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """``preferred`` when it is free on ``host``, else one the system picks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # an IPv6 address (services --host ::)
    for port in (preferred, 0):
        with socket.socket(family) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise PortTaken(f"no free port on {host}")


def require_free_port(host: str, port: int, *, what: str, variable: str) -> None:
    """Fail in one line, before a server starts, when ``port`` on ``host`` is taken or cannot be bound
    (the server's own failure would be a traceback from deep inside it)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PortTaken(f"{what} cannot listen on {host}:{port}: {error.strerror or error}. Fix: stop what "
                            f"holds the port (an earlier one still running?), or pick another: {variable}=<port>"
                            ) from None


def health_answer(url: str, timeout: float) -> None:
    """GET ``url``/health; any HTTP answer (even 401 from a proxy) counts as there. Raises OSError or
    ValueError (refused, DNS, timeout, a malformed URL) when nothing answers."""
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return


# MLflow 3's server answers a request whose Host header it does not allow (--allowed-hosts, against DNS
# rebinding) with 403 and this text; /health is exempt, so a health probe cannot see it.
HOST_REFUSED = b"Invalid Host header"


def refuses_host_header(url: str, timeout: float) -> bool:
    """Whether the MLflow server at ``url`` refuses API requests addressed as ``url`` addresses it.
    Any other answer, or none, is False: the caller's other checks and MLflow report those."""
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1",
                               timeout=timeout).close()
    except urllib.error.HTTPError as error:
        return error.code == 403 and HOST_REFUSED in error.read(200)
    except (OSError, ValueError):
        pass
    return False

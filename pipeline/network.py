"""Ports and HTTP probes on this machine: a free port, a port that must be free, a server that answers."""

from __future__ import annotations

import base64
import ipaddress
import os
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


class ExposedWithoutLogin(PipelineError):
    """A server with no login asked to listen beyond this machine, without the flag that says so."""


EXPOSE_FLAG = "--expose-without-login"


def check_exposure(host: str, expose: bool, *, what: str, exposes: str, port: int) -> None:
    """Refuse ``host`` unless it is loopback or the user passed EXPOSE_FLAG: `make ui`, `make dashboard`
    and `make serve` start servers with no login, so an address other machines reach hands them ``exposes``.
    A name other than localhost is refused too: it may resolve to any address."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback or expose:
        return
    raise ExposedWithoutLogin(
        f"--host {host} would open {what} to other machines with no login: whoever reaches it {exposes}. Fix: "
        f"leave --host out (127.0.0.1; from elsewhere, an ssh tunnel: ssh -L {port}:127.0.0.1:{port} <this machine>), "
        f"or add {EXPOSE_FLAG} if everyone on that network may.")


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


LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # what MLflow's client sends as basic auth


def api_refusal(url: str, timeout: float) -> tuple[int, bytes] | None:
    """The status and first bytes of a refused API call to the MLflow server at ``url``, made as
    MLflow's client makes it (with the login in $MLFLOW_TRACKING_USERNAME / _PASSWORD, or the bearer
    token in $MLFLOW_TRACKING_TOKEN, when set); None when the call succeeds or nothing answers (the
    caller's other checks and MLflow report those)."""
    request = urllib.request.Request(f"{url.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = (os.environ.get(name) for name in LOGIN_ENV)
    if user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):  # MLflow's client sends it so when no login is set
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as error:
        return error.code, error.read(200)
    except (OSError, ValueError):
        pass
    return None


def refuses_host_header(refusal: tuple[int, bytes] | None) -> bool:
    """Whether an api_refusal is MLflow refusing the Host header the URL makes clients send."""
    return refusal is not None and refusal[0] == 403 and HOST_REFUSED in refusal[1]


def asks_for_login(refusal: tuple[int, bytes] | None) -> bool:
    """Whether an api_refusal is a server that wants a login it was not given (or not this one)."""
    return refusal is not None and refusal[0] == 401

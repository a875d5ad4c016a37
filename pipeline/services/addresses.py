"""Which addresses `make services` binds, takes logins from, accepts requests for and prints for
clients: loopback by default; with `--host`, an address of this machine (its network may log in) or
every address (0.0.0.0 or ::)."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess

from pipeline.errors import PipelineError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
EVERY_ADDRESS = ("0.0.0.0", "::")


class AddressError(PipelineError):
    """--host names no address of this machine, or this machine's addresses cannot be listed."""


def client_address(host: str) -> str:
    """The address clients put in their URLs: the bound one, or loopback when bound to every address
    (other machines then use one of this machine's addresses, which the server cannot know)."""
    if host == "::":
        return "::1"  # PostgreSQL's IPv6 sockets take IPv6 only: 127.0.0.1 would not reach it
    return "127.0.0.1" if host == "0.0.0.0" else host


def host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address in a URL


def login_networks(host: str) -> list[str]:
    """The networks PostgreSQL takes password logins from when bound to ``host``: none beyond
    loopback for loopback; every address for 0.0.0.0 (or ::); else the network of the interface
    that holds the address (a bound address is one of this machine's, so its network is what the
    user opened the services to). Raises AddressError, naming this machine's addresses, when
    ``host`` is not one of them."""
    if host in LOOPBACK:
        return []
    if host in EVERY_ADDRESS:
        return ["0.0.0.0/0", "::/0"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # a name: the address it resolves to here
            address = ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0])
        except (OSError, ValueError):
            raise AddressError(f"--host {host}: not an address, and no name this machine can resolve. Fix: one of "
                                f"this machine's addresses ({', '.join(machine_addresses()) or 'none found'}), or "
                                f"0.0.0.0 for all of them.") from None
    for interface in machine_interfaces():
        if interface.ip == address:
            return [str(interface.network)]
    raise AddressError(f"--host {host} is not an address of this machine, so nothing can listen on it (this "
                        f"machine's addresses: {', '.join(machine_addresses()) or 'none found'}). Fix: one of "
                        f"those, or 0.0.0.0 for all of them.")


def machine_interfaces() -> list:
    """This machine's addresses with their networks (``ip -j addr``: iproute2, on every Linux)."""
    try:
        listed = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise AddressError("cannot list this machine's addresses: `ip` is missing. Fix: apt-get install "
                            "iproute2") from None
    return [ipaddress.ip_interface(f"{entry['local']}/{entry['prefixlen']}")
            for link in json.loads(listed.stdout or "[]") for entry in link.get("addr_info", [])
            if "local" in entry and "prefixlen" in entry]


def machine_addresses() -> list[str]:
    return [str(interface.ip) for interface in machine_interfaces() if not interface.ip.is_link_local]


def allowed_host_headers(host: str) -> list[str]:
    """The Host headers the tracking server accepts (MLflow 3 refuses others with 403, against DNS
    rebinding; its default allows loopback and RFC 1918 addresses only): loopback, the bound address
    and, bound to every address, each address and name of this machine; each bare and with any port."""
    names = {"localhost", "127.0.0.1", "[::1]"}
    if host in EVERY_ADDRESS:
        names |= {host_in_url(address) for address in machine_addresses()} | {socket.gethostname(), socket.getfqdn()}
    else:
        names.add(host_in_url(host))
    return sorted(pattern for name in names for pattern in (name, f"{name}:*"))

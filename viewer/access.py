"""Who may use a viewer: by default only browsers on the machine that serves it.

`panel serve` chooses the address it listens on, and without ``--address`` that is every
network interface: a viewer started on a laptop would show a lab's runs to its whole
café. weightlapse cannot change panel's default, so the app itself answers a browser on
another machine with a page that says how to share the viewer on purpose, and shows it no
run. ``--args --share`` (or WEIGHTLAPSE_SHARE=1) serves everyone who reaches the server;
docs/serving.md shows how to do that with origins and a login.

Which names the viewer answers to is a second question: a page on another site can point
its own host name at 127.0.0.1 (DNS rebinding) and then read the viewer as if it were that
site. :func:`host_is_served` accepts only the Host headers of loopback names on the
viewer's port and of the names allowed with ``--allow-websocket-origin``; viewer/app_hooks.py
refuses every other request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from bokeh.server.util import check_allowlist

NOT_SHARED_MESSAGE = (
    "**This weightlapse viewer is private to the machine it runs on.** Open it in a browser "
    "on that machine (http://127.0.0.1, same port), or restart it for your team with "
    "`--args --share`, as docs/serving.md in the weightlapse repository describes."
)


def is_same_machine(remote_ip: str | None) -> bool:
    """Whether a client address is a loopback address (this machine); unknown ones are not."""
    if not remote_ip:
        return False
    try:
        address = ipaddress.ip_address(remote_ip.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


# host:port, [ipv6]:port or either without a port (a Host header's forms).
_HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[0-9a-f:.%]+)\]|(?P<name>[^:\[\]]+))(?::(?P<port>[0-9]{1,5}))?")


def host_is_served(host: str, *, port: int | None, allowlist: Iterable[str]) -> bool:
    """Whether a request's Host header names this viewer.

    ``port``: the port the request came in on (None: unknown, any port); ``allowlist``: the
    names given with ``--allow-websocket-origin``, as Bokeh keeps them (``name:port``, with
    ``*`` wildcards: ``*`` alone allows every name). Loopback names (localhost, 127.0.0.0/8,
    [::1]) are served on ``port``; a Host without a port means port 80, as in HTTP.
    """
    match = _HOST_HEADER.fullmatch(host.lower())
    if match is None:
        return False
    name = match["ipv6"] or match["name"]
    host_port = int(match["port"] or 80)
    if (name == "localhost" or is_same_machine(name)) and (port is None or host_port == port):
        return True
    shown = f"[{name}]" if match["ipv6"] else name
    return check_allowlist(f"{shown}:{host_port}", [pattern.lower() for pattern in allowlist])

"""Who may use a viewer: by default only browsers on the machine that serves it.

`panel serve` chooses the address it listens on, and without ``--address`` that is every
network interface: a viewer started on a laptop would show a lab's runs to its whole
café. weightlapse cannot change panel's default, so the app itself answers a browser on
another machine with a page that says how to share the viewer on purpose, and shows it no
run. ``--args --share`` (or WEIGHTLAPSE_SHARE=1) serves everyone who reaches the server;
docs/serving.md shows how to do that with origins and a login.
"""

from __future__ import annotations

import ipaddress

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

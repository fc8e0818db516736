"""Server hooks of ``panel serve viewer/``: Bokeh runs ``on_server_loaded`` once, as the server starts.

The hook makes the server refuse every request whose Host header is not a name it serves
(viewer/access.py's host_is_served). That is the defence against DNS rebinding: a page on
``rebind.example`` whose name the attacker has pointed at 127.0.0.1 is, to the browser, the
same origin as the viewer, so the browser lets it read the viewer's pages and open its
WebSocket; Tornado then sees an Origin equal to the Host and skips Bokeh's origin
allowlist. Only the Host header still names the attacker's site.

It also keeps a link's query when the server's root redirects to the app: Bokeh sends
``/?run=a&step=5`` to ``/viewer`` and the run and step are lost on the way.
"""

from __future__ import annotations

import logging

from bokeh.server.tornado import BokehTornado
from bokeh.settings import settings
from tornado.httputil import HTTPServerRequest
from tornado.web import RedirectHandler, RequestHandler

from weightlapse.viewer.access import host_is_served

log = logging.getLogger("weightlapse.viewer")


class HostRefused(RequestHandler):
    """Answers a request for a host the viewer does not serve: 403, in plain text."""

    def initialize(self, message: str) -> None:
        self.message = message

    def prepare(self) -> None:
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.finish(self.message)


def refusal(host: str, port: int | None) -> str:
    shown = host[:100]
    where = f"port {port}" if port is not None else "its port"
    return (f"This weightlapse viewer does not serve the host {shown!r}. It answers at 127.0.0.1, localhost "
            f"and other loopback names on {where}, and at the names given with --allow-websocket-origin. To serve "
            f"this name on purpose, restart it with --allow-websocket-origin {shown} "
            "(see docs/serving.md in the weightlapse repository).\n")


def served_port(request: HTTPServerRequest) -> int | None:
    """The port the request came in on (None on a Unix socket): Tornado's application is not told it."""
    try:
        address = request.connection.stream.socket.getsockname()
    except (AttributeError, OSError):
        return None
    return address[1] if isinstance(address, tuple) else None


def allowed_names(application: BokehTornado) -> set[str]:
    # The same list Bokeh checks WebSocket origins against (bokeh.server.views.ws.WSHandler).
    override = settings.allowed_ws_origin()
    return set(override) if override else set(application.websocket_origins)


def guard_hosts(application_class: type[BokehTornado]) -> None:
    """Route every request of ``application_class`` whose Host is not served to HostRefused,
    and a served GET of the root with a query to the app's page with the query (root_redirect).

    Wrapping ``find_handler``, where Tornado picks the handler of each request, covers the
    app page, its WebSocket, autoload.js, Panel's endpoints and static files alike.
    """
    if getattr(application_class.find_handler, "guards_hosts", False):
        return
    find_handler = application_class.find_handler

    def guarded_find_handler(self, request: HTTPServerRequest, **kwargs):
        port = served_port(request)
        if host_is_served(request.host, port=port, allowlist=allowed_names(self)):
            target = root_redirect(self, request)
            if target is None:
                return find_handler(self, request, **kwargs)
            return self.get_handler_delegate(request, RedirectHandler, {"url": target, "permanent": False})
        log.warning("refused %s %s for host %r: not a name this viewer serves (serve a name on purpose with "
                    "--allow-websocket-origin, see docs/serving.md)", request.method, request.path[:100],
                    request.host[:100])
        return self.get_handler_delegate(request, HostRefused, {"message": refusal(request.host, port)})

    guarded_find_handler.guards_hosts = True
    application_class.find_handler = guarded_find_handler


def root_redirect(application: BokehTornado, request: HTTPServerRequest) -> str | None:
    """Where a GET of the server's root with a query goes: its one app's page (the query is
    kept by Tornado's RedirectHandler); None for any other request, which Bokeh answers."""
    routes = list(application.applications)
    if (request.method != "GET" or not request.query or len(routes) != 1 or not routes[0].startswith("/")
            or request.path.rstrip("/") != application.prefix.rstrip("/")):
        return None
    # A route is a concrete path here (`panel serve viewer/` serves "/viewer"); braces would be
    # format fields to RedirectHandler.
    route = routes[0]
    return None if any(token in route for token in "{}") else application.prefix.rstrip("/") + route


def on_server_loaded(server_context) -> None:
    # The hook is handed the app's context, not the Tornado application it runs in, so the
    # guard goes on Bokeh's application class: `panel serve` runs one per process.
    guard_hosts(BokehTornado)

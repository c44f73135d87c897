"""The declump web app: load an image, paint, train, separate, measure and download, in the browser.

Dash and Plotly come with the optional extra ``app`` and are imported only
here, when the app is built; the work itself is :mod:`gpu_pipeline.app.session`,
which calls the same functions as the command line.
"""
from __future__ import annotations

from gpu_pipeline._backend import DeclumpError

APP_EXTRA_HINT = "install the app extra: pip install 'declump[app]'"


def require_app_dependencies():
    """Import Dash and Plotly, or raise a one-line DeclumpError naming the extra that provides them."""
    import importlib

    for name in ("dash", "plotly"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise DeclumpError(f"declump app needs {name}, which is not installed; {APP_EXTRA_HINT}") from None


def create_app(image_path=None, *, max_voxels=None):
    """The Dash app; ``image_path`` (optional) is opened in every new browser session.

    Parameters
    ----------
    image_path : str or Path, optional
        An image file read like `declump run` reads its input.
    max_voxels : int, optional
        Largest image accepted (uploads and ``image_path``); default
        :data:`gpu_pipeline.app.session.DEFAULT_MAX_VOXELS`.
    """
    require_app_dependencies()
    from gpu_pipeline.app.ui import build_app

    return build_app(image_path, max_voxels=max_voxels)


def check_address(host, port):
    """Refuse, in one line, an address the app's server could not listen on: a host name that does not
    resolve, or a port another program holds. Before, the app printed its URL (a page of the other program,
    when the port was taken) and then Werkzeug's own lines, with exit status 1. The probe binds as
    Werkzeug does (``SO_REUSEADDR``: a port in TIME_WAIT is free for both, one listened on is not)."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise DeclumpError(f"--host {host} is not an address of this machine ({exc}); use 127.0.0.1 (this machine "
                           "only) or 0.0.0.0 (every interface)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            why = {errno.EADDRINUSE: "another program holds that port: choose another with --port, or stop it",
                   errno.EADDRNOTAVAIL: f"{host} is not an address of this machine: use 127.0.0.1 (this machine "
                                        "only) or 0.0.0.0 (every interface)",
                   errno.EACCES: "ports below 1024 need more privileges: choose another with --port"}
            raise DeclumpError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                               f"{why.get(exc.errno, 'choose another --port or --host')}") from None


def serve(image_path=None, *, host="127.0.0.1", port=8050, max_voxels=None, announce=print):
    """Build the app and serve it until interrupted (Flask's threaded server: one thread per request)."""
    check_address(host, port)
    app = create_app(image_path, max_voxels=max_voxels)
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
    announce(f"declump app: open http://{shown}:{port}/ in a browser (Ctrl+C stops it)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        announce(f"declump app: note: --host {host} lets other machines reach this page, with no password: "
                 "whoever reaches it can upload images and read the results")
    app.run(host=host, port=port, debug=False)


__all__ = ["create_app", "serve", "check_address", "require_app_dependencies", "APP_EXTRA_HINT"]

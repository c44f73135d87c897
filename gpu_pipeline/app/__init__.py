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


def serve(image_path=None, *, host="127.0.0.1", port=8050, max_voxels=None, announce=print):
    """Build the app and serve it until interrupted (Flask's threaded server: one thread per request)."""
    app = create_app(image_path, max_voxels=max_voxels)
    announce(f"declump app: open http://{host}:{port}/ in a browser (Ctrl+C stops it)")
    app.run(host=host, port=port, debug=False)


__all__ = ["create_app", "serve", "require_app_dependencies", "APP_EXTRA_HINT"]

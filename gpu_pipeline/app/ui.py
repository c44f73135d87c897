"""The page and its callbacks (Dash). State lives in the app's SessionStore, one Session per tab."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, ctx, dash_table, dcc, html, no_update

from gpu_pipeline._backend import DeclumpError, resolve_device
from gpu_pipeline._common import counted
from gpu_pipeline.app import session as sess
from gpu_pipeline.overlay import overlay_rgb
from gpu_pipeline.plots import size_histogram_rgb

#: Longest side of the image on screen (CSS pixels) at the default zoom; brush widths convert with it.
FIGURE_SIDE = 600
POLL_MS = 400
DEFAULT_BRUSH = 6
DEFAULT_OPACITY = 0.5
TABLE_ROWS = 12
HISTOGRAM_SIZE = (480, 300)
AXIS_NAMES = ("plane (z)", "row (y)", "column (x)")

PANEL = {"border": "1px solid #ddd", "borderRadius": "6px", "padding": "8px 10px", "marginBottom": "8px"}
LABEL = {"fontWeight": "bold", "display": "block", "marginTop": "4px"}


def backend_text(device):
    if device == "gpu":
        try:
            import cupy

            name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except Exception:
            name = "CUDA device"
        return f"backend: GPU ({name}, CuPy)"
    return "backend: CPU (NumPy/SciPy; no CUDA GPU found)"


def _text_input(id_, value):
    # Text, not number: values are parsed by the `declump run` option parser (which may accept 'auto').
    return dcc.Input(id=id_, type="text", value=value, debounce=True, style={"width": "90px"})


def layout_body(session_id, device):
    defaults = {k: ("" if v is None else f"{v:g}" if isinstance(v, float) else str(v))
                for k, v in sess.separation_defaults().items()}
    controls = html.Div(style={"width": "330px", "flex": "none", "fontSize": "14px"}, children=[
        html.Div(style=PANEL, children=[
            html.B("1. Load"),
            dcc.Upload(id="upload", children=html.Div(["Drop or ", html.A("choose"), " a TIFF, PNG or NPY"]),
                       max_size=2 ** 31 - 1, style={"border": "1px dashed #888", "padding": "8px",
                                                     "textAlign": "center", "margin": "4px 0"}),
            html.Button("Open the sample", id="sample"),
            html.Span(id="image-name", style={"marginLeft": "8px"}),
            html.Label("pixel/voxel spacing (plane,row,column) and unit", style=LABEL),
            dcc.Input(id="spacing", type="text", value="", debounce=True, style={"width": "150px"}),
            dcc.Input(id="unit", type="text", value="px", debounce=True, style={"width": "60px", "marginLeft": "6px"}),
            html.Div(id="plane-box", style={"display": "none"}, children=[
                html.Label(id="plane-label", style=LABEL),
                dcc.Slider(id="plane", min=0, max=1, step=1, value=0, marks=None,
                           tooltip={"placement": "bottom", "always_visible": False}),
            ]),
        ]),
        html.Div(style=PANEL, children=[
            html.B("2. Paint"),
            dcc.RadioItems(id="paint-class", value=2, inline=True, options=[
                {"label": html.Span(name, style={"color": sess.CLASS_COLOURS[value], "fontWeight": "bold",
                                                 "marginRight": "8px"}), "value": value}
                for value, name in sess.CLASS_NAMES.items()]),
            html.Label("brush width (image pixels)", style=LABEL),
            dcc.Slider(id="brush", min=1, max=30, step=1, value=DEFAULT_BRUSH, marks={1: "1", 10: "10", 20: "20", 30: "30"}),
            html.Button("Undo", id="undo"), html.Button("Clear", id="clear", style={"marginLeft": "6px"}),
        ]),
        html.Div(style=PANEL, children=[
            html.B("3. Train"),
            html.Div(html.Button("Train and predict", id="train"), style={"margin": "4px 0"}),
            html.Label("probability overlay opacity", style=LABEL),
            dcc.Slider(id="opacity", min=0, max=1, step=0.05, value=DEFAULT_OPACITY, marks={0: "0", 0.5: "0.5", 1: "1"}),
        ]),
        html.Div(style=PANEL, children=[
            html.B("4. Separate"),
            html.Label("foreground from", style=LABEL),
            dcc.RadioItems(id="foreground", value="automatic", options=[
                {"label": " automatic threshold (Otsu or Li)", "value": "automatic"},
                {"label": " the painted classifier", "value": "classifier"},
                {"label": " the shipped EM model", "value": "em-particles"}]),
            html.Label("method", style=LABEL),
            dcc.Dropdown(id="method", value=defaults["--method"], clearable=False,
                         options=[{"label": "k-means (declump)", "value": "kmeans"},
                                  {"label": "watershed", "value": "watershed"}]),
            html.Label(["min distance between centres (", html.Span(id="unit-1", children="px"), ")"], style=LABEL),
            _text_input("min-distance", defaults["--min-distance"]),
            html.Label(["min size (", html.Span(id="unit-2", children="px"),
                        "² or ³; auto or empty: a fraction of the typical particle)"], style=LABEL),
            _text_input("min-size", defaults["--min-size"]),
            html.Label(["max hole size (", html.Span(id="unit-3", children="px"), "² or ³; 0: off)"], style=LABEL),
            _text_input("hole-size", defaults["--max-hole-size"]),
            html.Label(["smoothing sigma (", html.Span(id="unit-4", children="px"), "; 0: off)"], style=LABEL),
            _text_input("sigma", defaults["--sigma"]),
            html.Label("polarity", style=LABEL),
            dcc.RadioItems(id="polarity", value=defaults["--polarity"], inline=True,
                           options=[{"label": f" {p} ", "value": p} for p in ("auto", "bright", "dark")]),
            html.Div(html.Button("Separate", id="separate"), style={"marginTop": "6px"}),
        ]),
        html.Div(style=PANEL, children=[
            html.B("5. Download"),
            html.Div(style={"display": "flex", "flexWrap": "wrap", "gap": "4px", "marginTop": "4px"}, children=[
                html.Button("labels (TIFF)", id="get-labels"), html.Button("table (CSV)", id="get-table"),
                html.Button("overlay (PNG)", id="get-overlay"), html.Button("histogram (PNG)", id="get-histogram"),
                html.Button("model", id="get-model"), html.Button("strokes (TIFF)", id="get-scribbles"),
                html.Button("command line", id="get-command")]),
            *[dcc.Download(id=f"download-{name}") for name in
              ("labels", "table", "overlay", "histogram", "model", "scribbles", "command")],
        ]),
    ])
    picture = html.Div(style={"flex": "none", "paddingLeft": "12px"}, children=[
        html.Div(id="status", style={"minHeight": "20px", "color": "#555"}),
        html.Div(id="message", style={"minHeight": "20px", "maxWidth": f"{FIGURE_SIDE}px", "color": "#b00020",
                                      "fontWeight": "bold"}),
        dcc.Checklist(id="show", value=["particles", "probabilities"], inline=True, options=[
            {"label": " particles ", "value": "particles"}, {"label": " probabilities ", "value": "probabilities"}]),
        dcc.Graph(id="graph", config={"scrollZoom": True, "displaylogo": False,
                                      "modeBarButtonsToAdd": ["drawopenpath", "eraseshape"]}),
    ])
    results = html.Div(style={"flex": "1", "minWidth": "380px", "maxWidth": "560px", "paddingLeft": "12px"},
                       children=[
        html.Div(id="count", style={"fontSize": "18px", "fontWeight": "bold", "margin": "6px 0"}),
        html.Div(id="hovered", style={"minHeight": "20px"}),
        html.Img(id="histogram", style={"width": "100%", "display": "none"}),
        dash_table.DataTable(id="table", sort_action="native", page_action="native", page_size=TABLE_ROWS,
                             style_table={"overflowX": "auto"},
                             style_cell={"fontSize": "12px", "padding": "2px 6px", "minWidth": "60px"}),
    ])
    return html.Div(style={"fontFamily": "sans-serif", "margin": "8px"}, children=[
        dcc.Store(id="session", data=session_id),
        dcc.Store(id="shown-job", data=0),  # the number of the last job whose end the page has shown
        dcc.Interval(id="poll", interval=POLL_MS, disabled=True),
        html.Div(style={"display": "flex", "alignItems": "baseline", "gap": "16px"}, children=[
            html.H2("declump", style={"margin": "0 0 6px 0"}),
            html.Span("paint, train, separate and measure touching particles"),
            html.Span(id="backend", children=backend_text(device), style={"color": "#05702f"})]),
        html.Div(style={"display": "flex", "flexWrap": "wrap", "alignItems": "flex-start"},
                 children=[controls, picture, results]),
    ])


def _screen_ratio(shape):
    return FIGURE_SIDE / max(shape[-2:])


def build_figure(session, plane, show, opacity, paint_class, brush):
    """The image (or its overlay), the probability overlay and this plane's strokes, drawable."""
    fig = go.Figure()
    image = session.image
    if image is None:
        fig.update_layout(width=FIGURE_SIDE, height=300, xaxis={"visible": False}, yaxis={"visible": False},
                          annotations=[{"text": "Upload an image or open the sample", "showarrow": False,
                                        "font": {"size": 16}}], margin={"l": 0, "r": 0, "t": 0, "b": 0})
        return fig
    factor = sess.display_factor(image.shape)
    image_plane = image[plane] if image.ndim == 3 else image
    labels_plane = np.zeros(image_plane.shape, dtype=np.int32)
    if session.result is not None and "particles" in show:
        labels_plane = session.result.labels[plane] if image.ndim == 3 else session.result.labels
    base = overlay_rgb(image_plane[::factor, ::factor], labels_plane[::factor, ::factor])
    offset = (factor - 1) / 2
    place = dict(x0=offset, y0=offset, dx=factor, dy=factor)
    fig.add_trace(go.Image(source=sess.png_data_uri(base), name="image", hovertemplate="x %{x}, y %{y}<extra></extra>",
                           **place))
    if session.probabilities is not None and "probabilities" in show:
        rgba = sess.probability_rgba(session.probabilities, plane if image.ndim == 3 else None, factor)
        # Hover-enabled too: a top trace that skips hover hides the image's hover events beneath it.
        opacity = opacity if isinstance(opacity, (int, float)) else DEFAULT_OPACITY
        fig.add_trace(go.Image(source=sess.png_data_uri(rgba), name="probabilities", opacity=float(opacity),
                               hovertemplate="x %{x}, y %{y}<extra></extra>", **place))
    ratio = _screen_ratio(image.shape)
    height, width = image.shape[-2:]
    shapes = [sess.stroke_to_shape(s, ratio) for s in session.strokes if s.plane == plane]
    brush = brush if isinstance(brush, (int, float)) else DEFAULT_BRUSH  # an emptied number box: None
    fig.update_layout(  # Plotly refuses figures under 10 px: a thin image (512 x 6) gets a taller-than-drawn one
        width=max(round(width * ratio) + 2, 10), height=max(round(height * ratio) + 2, 10),
        margin={"l": 1, "r": 1, "t": 1, "b": 1},
        xaxis={"visible": False, "range": [-0.5, width - 0.5]},
        yaxis={"visible": False, "range": [height - 0.5, -0.5], "scaleanchor": "x"},
        dragmode="drawopenpath", shapes=shapes, uirevision=f"{session.name}-{image.shape}",
        newshape={"line": {"color": sess.CLASS_COLOURS[int(paint_class)], "width": float(brush) * ratio},
                  "opacity": 0.8, "layer": "above"})
    return fig


def parse_spacing(text, ndim):
    try:
        values = [float(v) for v in re.split(r"[,\s]+", str(text).strip()) if v]
    except ValueError:
        raise DeclumpError(f"spacing must be numbers separated by commas (plane,row,column), got {text!r}")
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim:
        raise DeclumpError(f"spacing needs {ndim} numbers for a {ndim}D image (or one for all axes), got {text!r}")
    return values


def table_view(result, unit):
    size = "area" if "area" in result.table else "volume"
    columns = ["label", size, "equivalent_diameter"] + [c for c in result.table if c.startswith("centroid_")] + \
        ["voxel_count", "mean_intensity"]
    columns = [c for c in columns if c in result.table]
    rows = [{c: (round(float(v), 4) if isinstance(v, (float, np.floating)) else int(v))
             for c, v in zip(columns, values)} for values in zip(*(result.table[c] for c in columns))]
    names = {size: f"{size} ({unit}{'²' if size == 'area' else '³'})",
             "equivalent_diameter": f"equivalent diameter ({unit})"}
    names.update({c: f"{c.replace('_', ' ')} ({unit})" for c in columns if c.startswith("centroid_")})
    return [{"name": names.get(c, c.replace("_", " ")), "id": c} for c in columns], rows


def build_app(image_path=None, *, max_voxels=None):
    max_voxels = int(max_voxels or sess.DEFAULT_MAX_VOXELS)
    device = resolve_device("auto")
    store = sess.SessionStore()
    initial = None
    if image_path is not None:
        # Read as an upload is (the CLI's reader and checks; the spacing and unit the file gives: a TIFF's, an
        # OME-Zarr's, whose unit the app dropped before).
        image, spacing, unit = sess.read_image_file(image_path, max_voxels=max_voxels)
        initial = dict(image=image, name=Path(image_path).name, source=str(image_path), spacing=spacing, unit=unit)

    app = Dash(__name__, title="declump", update_title=None)
    app.server.config["MAX_CONTENT_LENGTH"] = None
    app.declump_sessions = store  # per-app, per-tab state; never module globals

    def layout():
        session_id = store.new_id()
        if initial is not None:
            store.get(session_id).set_image(max_voxels=max_voxels, **initial)
        return layout_body(session_id, device)

    app.layout = layout

    @app.callback(
        Output("graph", "figure"), Output("status", "children"), Output("message", "children"),
        Output("poll", "disabled"), Output("image-name", "children"),
        Output("spacing", "value"), Output("unit", "value"),
        Output("plane-box", "style"), Output("plane", "max"), Output("plane", "value"), Output("plane-label", "children"),
        Output("count", "children"), Output("histogram", "src"), Output("histogram", "style"),
        Output("table", "columns"), Output("table", "data"), Output("upload", "contents"),
        Output("shown-job", "data"),
        Input("upload", "contents"), Input("sample", "n_clicks"), Input("graph", "relayoutData"),
        Input("undo", "n_clicks"), Input("clear", "n_clicks"), Input("plane", "value"),
        Input("paint-class", "value"), Input("brush", "value"), Input("show", "value"), Input("opacity", "value"),
        Input("spacing", "value"), Input("unit", "value"), Input("train", "n_clicks"),
        Input("separate", "n_clicks"), Input("poll", "n_intervals"),
        State("upload", "filename"), State("foreground", "value"), State("method", "value"),
        State("min-distance", "value"), State("min-size", "value"), State("hole-size", "value"),
        State("sigma", "value"), State("polarity", "value"), State("session", "data"), State("shown-job", "data"),
    )
    def act(*values):
        acknowledged = [no_update]  # the ended job this reply shows, where it shows one (Session.finished_since)
        return (*_act(*values[:-1], shown_job=values[-1], acknowledged=acknowledged), acknowledged[0])

    def _act(contents, _sample, relayout, _undo, _clear, plane, paint_class, brush, show, opacity, spacing_text,
             unit, _train, _separate, _poll, filename, foreground, method, min_distance, min_size, hole_size, sigma,
             polarity, session_id, *, shown_job, acknowledged):
        trigger = ctx.triggered_id
        try:
            session = store.get(session_id)
        except DeclumpError as exc:  # a tampered or expired page: say so, change nothing
            return (no_update, "", str(exc), True) + (no_update,) * 13
        message, status, reload = "", no_update, False
        plane = int(plane or 0)
        # The upload field is emptied after each upload, so choosing the same file again (fixed, or after the
        # sample) is a new upload; its own emptying calls back with no contents and changes nothing.
        clear_upload = None if trigger == "upload" and contents else no_update
        try:
            if trigger == "upload" and not contents:
                return (no_update,) * 17
            if trigger is None and session.image is not None:
                # The page's first call, on an image given to `declump app IMAGE`: its spacing, unit and middle
                # plane shown as an upload's are (the spacing box stayed empty, and Separate was refused).
                reload = True
            elif trigger == "upload":
                image, spacing, file_unit = sess.read_upload(filename, contents, max_voxels=max_voxels)
                session.set_image(image, name=Path(filename).name, spacing=spacing, unit=file_unit,
                                  max_voxels=max_voxels)
                reload = True
            elif trigger == "sample":
                from gpu_pipeline.synthetic import demo_sample

                image, _, spacing = demo_sample()
                session.set_image(image, name="sample", spacing=spacing, unit="px", max_voxels=max_voxels)
                reload = True
            elif trigger == "graph" and relayout and session.image is not None:
                _apply_relayout(session, relayout, plane)  # the browser already shows the strokes
                return (no_update,) * 17
            elif trigger == "undo":
                session.undo(plane)
            elif trigger == "clear":
                session.clear_strokes()
            elif trigger in ("spacing", "unit"):
                _take_spacing(session, spacing_text, unit)
            elif trigger == "train":
                _take_spacing(session, spacing_text, unit)
                session.start_job("training", lambda progress: session.train(progress))
                return _busy(session)
            elif trigger == "separate":
                options = {"--method": method, "--min-distance": min_distance, "--min-size": min_size,
                           "--max-hole-size": hole_size, "--sigma": sigma, "--polarity": polarity}
                try:
                    sess.separation_options(options)  # a bad value is a message now, not a failed job
                    _take_spacing(session, spacing_text, unit)  # the spacing shown is the one used, or a message
                except DeclumpError:
                    session.drop_result()  # as a failed separation does: the one shown had other settings
                    status = ""  # ("separated in 0.10 s" was that result's)
                    raise
                session.start_job("separating", lambda progress: _separate_job(session, options, foreground, device,
                                                                                progress))
                return _busy(session)
            elif trigger == "poll":
                running, text = session.job_status()
                if running:
                    return (no_update, text) + (no_update,) * 15
        except DeclumpError as exc:
            message = str(exc)
        except MemoryError:
            message = "out of memory; use a smaller image or a machine with more memory"
        except Exception as exc:  # say it in the page; the server and the other tabs go on
            message = f"unexpected error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        finished = session.finished_since(shown_job)  # shown by every reply after a job ended, until one lands
        if finished:
            acknowledged[0], error = finished
            message, status = message or error, _done_text(session)
        if session.image is not None and session.image.ndim == 3:
            plane = min(plane, session.image.shape[0] - 1)
        if reload and session.image is not None:
            plane = session.image.shape[0] // 2 if session.image.ndim == 3 else 0
        try:
            figure, count, hist_src, hist_style, columns, rows = _render(session, plane, show or [], opacity,
                                                                         paint_class, brush)
        except Exception as exc:  # a picture that cannot be drawn is a message, not an HTTP 500 and a stale page
            message = f"could not draw the image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            return (no_update, status, message, True) + (no_update,) * 12 + (clear_upload,)
        image = session.image
        name = "" if image is None else f"{session.name}: {' x '.join(map(str, image.shape))} {image.dtype}"
        is_3d = image is not None and image.ndim == 3
        running, _ = session.job_status()
        if reload:
            status = ""
        return (figure, status, message,
                not running, name,
                sess.format_spacing(session.spacing) if reload else no_update,
                session.unit if reload else no_update,
                {"display": "block"} if is_3d else {"display": "none"},
                image.shape[0] - 1 if is_3d else 1, plane if (reload or is_3d) else no_update,
                f"{AXIS_NAMES[0]}: {plane} of 0-{image.shape[0] - 1}" if is_3d else "",
                count, hist_src, hist_style, columns, rows, clear_upload)

    def _busy(session):
        _, text = session.job_status()
        return (no_update, text, "", False) + (no_update,) * 13

    def _done_text(session):
        parts = []
        painted = session.classifier_source == "painted"
        if "train_s" in session.timings and painted:
            features = session.timings.get("features_s", 0.0)
            parts.append((f"features in {features:.2f} s, " if features >= 0.01 else "") +
                         f"trained in {session.timings['train_s']:.2f} s, predicted in "
                         f"{session.timings['predict_s']:.2f} s")
        elif session.classifier is not None and "shipped_predict_s" in session.timings:
            parts.append(f"{session.classifier_source} model predicted in "
                         f"{session.timings['shipped_predict_s']:.2f} s")
        if session.result is not None:
            parts.append(f"separated in {session.result.seconds:.2f} s")
        return "; ".join(parts)

    def _render(session, plane, show, opacity, paint_class, brush):
        figure = build_figure(session, plane, show, opacity, paint_class, brush)
        result = session.result
        if result is None:
            return figure, "", None, {"display": "none"}, [], []
        count = counted(len(result.table['label']), "particle")
        hist = sess.png_data_uri(size_histogram_rgb(result.table["equivalent_diameter"], unit=session.unit,
                                                    size=HISTOGRAM_SIZE))
        columns, rows = table_view(result, session.unit)
        return figure, count, hist, {"width": "100%", "display": "block"}, columns, rows

    @app.callback(Output("table", "style_data_conditional"), Output("hovered", "children"),
                  Output("histogram", "src", allow_duplicate=True), Output("table", "page_current"),
                  Input("graph", "hoverData"), Input("graph", "clickData"), State("plane", "value"),
                  State("table", "derived_virtual_data"), State("session", "data"), prevent_initial_call=True)
    def highlight(hover, click, plane, shown_rows, session_id):
        session = store.get(session_id)
        data = click if "graph.clickData" in ctx.triggered_prop_ids else hover
        result = session.result
        if result is None or not data or not data.get("points"):
            return [], "", no_update, no_update
        point = data["points"][0]
        row, col = int(round(point["y"])), int(round(point["x"]))
        labels = result.labels[int(plane or 0)] if result.labels.ndim == 3 else result.labels
        if not (0 <= row < labels.shape[0] and 0 <= col < labels.shape[1]):
            return [], "", no_update, no_update
        label = int(labels[row, col])
        if label == 0:
            return [], f"background at row {row}, column {col}", no_update, no_update
        index = int(np.searchsorted(result.table["label"], label))
        diameter = float(result.table["equivalent_diameter"][index])
        style = [{"if": {"filter_query": f"{{label}} = {label}"}, "backgroundColor": "#ffe08a",
                  "fontWeight": "bold"}]
        hist = sess.png_data_uri(size_histogram_rgb(result.table["equivalent_diameter"], unit=session.unit,
                                                    size=HISTOGRAM_SIZE, highlight=diameter))
        order = [r.get("label") for r in shown_rows or []]
        page = order.index(label) // TABLE_ROWS if label in order else index // TABLE_ROWS
        return style, f"particle {label}: equivalent diameter {diameter:.4g} {session.unit}", hist, page

    for slider, default in (("brush", DEFAULT_BRUSH), ("opacity", DEFAULT_OPACITY)):
        @app.callback(Output(slider, "value", allow_duplicate=True), Input(slider, "value"), prevent_initial_call=True)
        def emptied(value, default=default):
            # An emptied (or unreadable) number box gives None: the page drew with the default while the thumb
            # stayed where it was (30 px shown, 6 px painted). The slider shows the default it draws with.
            return default if value is None else no_update

    @app.callback(Output("table", "style_data_conditional", allow_duplicate=True),
                  Output("hovered", "children", allow_duplicate=True), Input("table", "data"),
                  prevent_initial_call=True)
    def forget_highlight(_rows):
        # The table is drawn anew on every render of the page (another result, image or plane, and any display
        # control too): the particle named under the graph and its highlighted row may be the result before's
        # (its label 43 another particle now, or none), so they go; hovering again names the particle.
        return [], ""

    @app.callback(*[Output(f"unit-{i}", "children") for i in range(1, 5)], Input("unit", "value"))
    def show_unit(unit):
        return ((unit or "px").strip() or "px",) * 4

    downloads = {
        "labels": lambda s: dict(content=_b64(sess.labels_tiff_bytes(_need_result(s).labels)), base64=True,
                                 filename=f"{_stem(s)}_labels.tif"),
        "table": lambda s: dict(content=sess.table_csv_text(_need_result(s).table),
                                filename=f"{_stem(s)}_labels_particles.csv"),
        "overlay": lambda s: dict(content=_b64(_png(overlay_rgb(s.image, _need_result(s).labels))), base64=True,
                                  filename=f"{_stem(s)}_labels_overlay.png"),
        "histogram": lambda s: dict(content=_b64(_png(size_histogram_rgb(
            _need_result(s).table["equivalent_diameter"], unit=s.unit))), base64=True,
            filename=f"{_stem(s)}_labels_histogram.png"),
        "model": lambda s: dict(content=_b64(_model_bytes(s)), base64=True, filename=_model_name(s)),
        "scribbles": lambda s: dict(content=_b64(sess.labels_tiff_bytes(_need_strokes(s).scribbles())), base64=True,
                                    filename=f"{_stem(s)}_scribbles.tif"),
        "command": lambda s: dict(content=sess.command_line(s) or _raise("separate first"),
                                  filename=f"{_stem(s)}_command.txt"),
    }
    for name, make in downloads.items():
        _download_callback(app, store, name, make)
    return app


def _download_callback(app, store, name, make):
    @app.callback(Output(f"download-{name}", "data"), Output("message", "children", allow_duplicate=True),
                  Input(f"get-{name}", "n_clicks"), State("session", "data"), prevent_initial_call=True)
    def download(_clicks, session_id):
        session = store.get(session_id)
        try:
            with session.lock:
                return make(session), ""
        except DeclumpError as exc:
            return no_update, str(exc)


def _apply_relayout(session, relayout, plane):
    """Strokes drawn, edited or erased in the browser -> the session's strokes of this plane."""
    ratio = _screen_ratio(session.image.shape)
    if "shapes" in relayout:
        strokes = [sess.stroke_from_shape(shape, plane, 1 / ratio) for shape in relayout["shapes"] or []]
        session.set_plane_strokes(plane, [s for s in strokes if s is not None])
        return True
    edits = {int(m.group(1)): value for key, value in relayout.items()
             if (m := re.fullmatch(r"shapes\[(\d+)\]\.path", key))}
    if edits:
        with session.lock:
            mine = [s for s in session.strokes if s.plane == plane]
            for index, path in edits.items():
                if index < len(mine):
                    mine[index].points = sess.parse_path(path)
        return True
    return False


def _take_spacing(session, text, unit):
    """The spacing and unit fields as they are now, checked (a bad value is a message and nothing runs)."""
    if session.image is not None:
        session.set_spacing(parse_spacing(text, session.image.ndim), (unit or "").strip() or None)


def _separate_job(session, options, foreground, device, progress):
    # A separation refused for its classifier (none trained yet, a 2D model on a 3D image) left the result
    # before it on the page and in the downloads, as a failed separation no longer does.
    session.drop_result(own_job=True)
    if foreground == "classifier":
        session.use_painted_classifier()  # the strokes' model, also after the shipped one was used
    elif foreground != "automatic":
        if session.classifier_source != foreground:
            session.use_shipped_model(foreground, progress)
        foreground = "classifier"
    session.separate(options, foreground=foreground, device=device, progress=progress)


def _need_image(session):
    if session.image is None:
        raise DeclumpError("load an image first")
    return session


def _need_strokes(session):
    """The session, with strokes to download (an empty scribble image was one `declump train` then refused)."""
    if not _need_image(session).strokes:
        raise DeclumpError("paint strokes first (2. Paint): there are none to download yet")
    return session


def _need_result(session):
    if session.result is None:
        raise DeclumpError("separate first: there is no result to download yet")
    return session.result


def _model_bytes(session):
    import tempfile

    if session.classifier is None:
        raise DeclumpError("train the classifier first: there is no model to download yet")
    with tempfile.TemporaryDirectory(prefix="declump-model-") as folder:
        path = Path(folder) / "model.npz"
        session.classifier.save(path)
        return path.read_bytes()


def _model_name(session):
    """The model download's name: the painted one as the command line names it, a shipped one by its own name
    (the shipped model was downloaded as IMAGE_model.npz, the painted model's name)."""
    if session.classifier_source in (None, "painted"):
        return f"{_stem(session)}_model.npz"
    return f"{session.classifier_source}.npz"


def _stem(session):
    return Path(session.name or "image").with_suffix("").name


def _png(rgb):
    from gpu_pipeline.plots import png_bytes

    return png_bytes(rgb)


def _b64(data):
    import base64

    return base64.b64encode(data).decode()


def _raise(text):
    raise DeclumpError(text)

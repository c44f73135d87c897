"""The web app end to end in headless Chromium driven by Selenium: load, paint, train, separate, download.

The app runs in this process on a real HTTP server (Flask/werkzeug, threaded), the browser is a real
Chromium. Without Chromium and its driver (Debian: apt-get install chromium chromium-driver) these tests skip.
Set DECLUMP_APP_SCREENSHOT=PATH to save the page after the separation (the README's picture).
"""
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest

pytest.importorskip("dash", reason="the app extra is not installed (pip install 'declump[app]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from gpu_pipeline.app import create_app  # noqa: E402
from gpu_pipeline.app import session as sess  # noqa: E402

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1100")


def _find_browser():
    chrome = os.environ.get("DASH_TEST_CHROMEPATH") or next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if chrome is None or driver is None:
        pytest.skip("no headless browser: Chromium and chromedriver not found (Debian: apt-get install chromium "
                    "chromium-driver; or set DASH_TEST_CHROMEPATH)")
    return chrome, driver


@pytest.fixture(scope="module")
def served():
    """The app on a real threaded HTTP server on a free local port; yields (app, url)."""
    from werkzeug.serving import make_server

    _find_browser()
    app = create_app()
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    chrome, driver_path = _find_browser()
    downloads = tmp_path_factory.mktemp("downloads")
    profile = tempfile.mkdtemp(prefix="declump-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(check, timeout=60, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # element not there yet, stale while Dash re-renders
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")


def text_of(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def open_page(driver, url):
    driver.get(url)
    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "#graph .main-svg"), what="the graph")


def separated_sample(driver, url):
    """A fresh page with the sample loaded and separated at the defaults."""
    open_page(driver, url)
    driver.find_element(By.ID, "sample").click()
    wait_for(lambda: text_of(driver, "image-name").startswith("sample"), what="the sample to load")
    driver.find_element(By.ID, "separate").click()
    wait_for(lambda: text_of(driver, "count").endswith("particles"), what="the first separation")


def choose(driver, radio_id, value):
    driver.find_element(By.CSS_SELECTOR, f"#{radio_id} input[value='{value}']").click()


def paint(driver, image_shape, points, value):
    """Drag the mouse over the image along (row, column) points, with the brush of class ``value``."""
    choose(driver, "paint-class", value)
    brush = "return document.querySelector('#graph .js-plotly-plot')._fullLayout.newshape.line.color"
    wait_for(lambda: driver.execute_script(brush).lower() == sess.CLASS_COLOURS[value], what="the brush colour")
    area = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "#graph .nsewdrag"), what="the plot area")
    box = area.rect
    height, width = image_shape

    def offset(row, col):  # from the plot area's centre, as Selenium 4 measures it
        x = (col + 0.5) / width * box["width"] - box["width"] / 2
        y = (row + 0.5) / height * box["height"] - box["height"] / 2
        return int(round(x)), int(round(y))

    actions = ActionChains(driver, duration=20)
    actions.move_to_element_with_offset(area, *offset(*points[0])).click_and_hold()
    previous = offset(*points[0])
    for point in points[1:]:
        current = offset(*point)
        actions.move_by_offset(current[0] - previous[0], current[1] - previous[1])
        previous = current
    actions.release().perform()


def app_session(app, name):
    sessions = [s for s in app.declump_sessions._sessions.values() if s.name == name]
    assert len(sessions) == 1
    return sessions[0]


def strokes_for(truth):
    """Mouse paths: two along background rows, two inside the biggest particles (row, column)."""
    from scipy import ndimage as ndi

    background = []
    rows = [r for r in range(10, truth.shape[0] - 10, 7) if not truth[r, 40:200].any()]
    for row in rows[:2]:
        background.append([(row, 40 + 20 * k) for k in range(9)])
    sizes = np.bincount(truth.ravel())
    sizes[0] = 0
    particle = []
    for label in np.argsort(sizes)[::-1][:2]:
        distance = ndi.distance_transform_edt(truth == label)
        row, col = np.unravel_index(np.argmax(distance), truth.shape)
        reach = max(int(distance[row, col]) - 3, 1)
        particle.append([(row, col - reach), (row, col), (row, col + reach)])
    assert len(background) == 2 and len(particle) == 2
    return background, particle


def test_paint_train_separate_and_download_match_the_python_api(served, browser):
    from gpu_pipeline import particle_table, separate
    from gpu_pipeline.classifier import train_classifier
    from gpu_pipeline.synthetic import demo_sample

    app, url = served
    image, truth, spacing = demo_sample()
    open_page(browser, url)
    assert "backend:" in text_of(browser, "backend")
    browser.find_element(By.ID, "sample").click()
    wait_for(lambda: text_of(browser, "image-name").startswith("sample"), what="the sample to load")
    background, particle = strokes_for(truth)
    for path in background:
        paint(browser, image.shape, path, 1)
    for path in particle:
        paint(browser, image.shape, path, 2)
    session = app_session(app, "sample")
    wait_for(lambda: len(session.strokes) == 4, what="four strokes to reach the server")
    # The strokes landed where the mouse went: background on background, particle on particles.
    scribbles = session.scribbles()
    assert set(np.unique(scribbles)) == {0, 1, 2}
    assert (truth[scribbles == 1] == 0).mean() > 0.95 and (truth[scribbles == 2] > 0).mean() > 0.95

    browser.find_element(By.ID, "train").click()
    wait_for(lambda: "trained in" in text_of(browser, "status"), what="training to finish")
    choose(browser, "foreground", "classifier")
    browser.find_element(By.ID, "separate").click()
    count = wait_for(lambda: text_of(browser, "count"), what="the separation")
    assert text_of(browser, "message") == ""
    # Hovering over a particle (beside the stroke: strokes take the pointer) names it and highlights its row.
    row, col = particle[0][1]
    row += (particle[0][2][1] - col + 3) // 2
    label = int(session.result.labels[row, col])
    area = browser.find_element(By.CSS_SELECTOR, "#graph .nsewdrag")
    ActionChains(browser).move_to_element_with_offset(
        area, int((col + 0.5) / image.shape[1] * area.rect["width"] - area.rect["width"] / 2),
        int((row + 0.5) / image.shape[0] * area.rect["height"] - area.rect["height"] / 2)).perform()
    ActionChains(browser).move_by_offset(1, 0).perform()  # Plotly hovers on a move within the plot
    wait_for(lambda: text_of(browser, "hovered").startswith(f"particle {label}:"),
             what=lambda: f"particle {label} to be named on hover (page says {text_of(browser, 'hovered')!r})")
    highlighted = wait_for(lambda: [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#table td.dash-cell")
                                    if "255, 224, 138" in c.value_of_css_property("background-color")],
                           what="the highlighted row")
    assert str(label) in highlighted
    browser.find_element(By.ID, "get-table").click()
    csv_path = browser.downloads / "sample_labels_particles.csv"
    wait_for(csv_path.exists, what="the CSV download")
    if os.environ.get("DECLUMP_APP_SCREENSHOT"):
        browser.find_element(By.CSS_SELECTOR, "#show input[value='probabilities']").click()
        time.sleep(2)
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(os.environ["DECLUMP_APP_SCREENSHOT"])

    # The same image, strokes and parameters through the Python API.
    model = train_classifier([image], [scribbles], spacing=spacing, **sess.TRAINING)
    labels = separate(image, spacing=spacing, classifier=model)  # the defaults of separate = declump run's
    table = particle_table(labels, image, spacing)
    assert count == f"{int(labels.max())} particles"
    assert csv_path.read_bytes() == sess.table_csv_text(table).encode()


def test_a_bad_upload_shows_a_message_and_the_server_keeps_running(served, browser, tmp_path):
    _, url = served
    open_page(browser, url)
    bad = tmp_path / "not_an_image.tif"
    bad.write_bytes(b"this is a text file, not a TIFF")
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(bad))
    message = wait_for(lambda: text_of(browser, "message"), what="the error message")
    assert "not_an_image.tif" in message and "could not read" in message
    volume = tmp_path / "five_d.npy"
    np.save(volume, np.random.default_rng(0).random((2, 2, 3, 8, 8)))
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(volume))
    wait_for(lambda: "2D or 3D" in text_of(browser, "message"), what="the 5D message")
    colour = tmp_path / "colour.npy"  # a colour image saved as an array: refused as declump run refuses it
    np.save(colour, np.random.default_rng(0).integers(0, 256, (128, 160, 3)).astype(np.uint8))
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(colour))
    refused = "colour.npy has shape (128, 160, 3): a 2D image with 3 channels last"
    wait_for(lambda: refused in text_of(browser, "message"), what="the colour array's message")
    assert text_of(browser, "image-name") == ""  # not shown as a volume of 3 planes
    browser.find_element(By.ID, "sample").click()  # still serving
    wait_for(lambda: text_of(browser, "image-name").startswith("sample"), what="the sample after the errors")
    spacing = browser.find_element(By.ID, "spacing")
    spacing.clear()
    spacing.send_keys("0.5,x\n")
    wait_for(lambda: "spacing must be numbers" in text_of(browser, "message"), what="the spacing message")
    spacing.clear()
    spacing.send_keys("0.5\n")
    unit = browser.find_element(By.ID, "unit")
    unit.clear()
    unit.send_keys("nm\n")
    distance = browser.find_element(By.ID, "min-distance")
    distance.clear()
    distance.send_keys("near\n")
    browser.find_element(By.ID, "separate").click()
    wait_for(lambda: "--min-distance" in text_of(browser, "message"), what="the min-distance message")
    distance.clear()
    distance.send_keys("2\n")
    browser.find_element(By.ID, "separate").click()
    wait_for(lambda: text_of(browser, "count"), what="the separation in nm")
    header = browser.find_element(By.CSS_SELECTOR, "#table").text
    assert "equivalent diameter (nm)" in header and "area (nm²)" in header
    from gpu_pipeline import separate
    from gpu_pipeline.synthetic import demo_sample

    expected = separate(demo_sample()[0], spacing=(0.5, 0.5), min_distance=2.0)
    assert text_of(browser, "count") == f"{int(expected.max())} particles"


def test_a_second_session_does_not_see_the_first_ones_image(served, browser, tmp_path):
    app, url = served
    open_page(browser, url)
    first = browser.current_window_handle
    browser.find_element(By.ID, "sample").click()
    wait_for(lambda: text_of(browser, "image-name").startswith("sample"), what="the sample in the first tab")
    browser.switch_to.new_window("tab")
    open_page(browser, url)
    assert text_of(browser, "image-name") == ""
    assert "Upload an image" in browser.find_element(By.ID, "graph").text
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(1).random((10, 40, 50)))
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(other))
    wait_for(lambda: text_of(browser, "image-name").startswith("other.npy: 10 x 40 x 50"),
             what="the second tab's volume")
    assert text_of(browser, "plane-label") == "plane (z): 5 of 0-9"  # a volume opens at its middle plane
    browser.close()
    browser.switch_to.window(first)
    choose(browser, "paint-class", 1)  # any control re-renders the page from this tab's server state
    time.sleep(1)
    assert text_of(browser, "image-name").startswith("sample: 384 x 384")


def test_the_same_file_again_a_thin_image_and_an_error_after_another_click_all_show(served, browser, tmp_path):
    """Three things a user met: choosing the same file again did nothing (the upload field kept its contents);
    a 512 x 6 image made Plotly refuse the figure (HTTP 500, the page kept showing the previous image while the
    server held the new one); a click on another control right after Train swallowed Train's error and froze
    the status at 'training ... 0 s'."""
    _, url = served
    open_page(browser, url)
    thin = tmp_path / "thin.npy"
    np.save(thin, (np.random.default_rng(2).random((6, 512)) * 200).astype(np.uint8))
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(thin))
    wait_for(lambda: text_of(browser, "image-name").startswith("thin.npy: 6 x 512"), what="the thin image")
    assert text_of(browser, "message") == ""
    browser.find_element(By.ID, "sample").click()
    wait_for(lambda: text_of(browser, "image-name").startswith("sample"), what="the sample")
    field = browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]")
    browser.execute_script("arguments[0].value = ''", field)  # as the file dialog starts (react-dropzone)
    field.send_keys(str(thin))
    wait_for(lambda: text_of(browser, "image-name").startswith("thin.npy"), what="the same file chosen again")
    browser.find_element(By.ID, "train").click()  # no strokes: an error
    choose(browser, "paint-class", 1)
    wait_for(lambda: "paint strokes of at least two classes" in text_of(browser, "message"),
             what="Train's error after another click")
    wait_for(lambda: "training" not in text_of(browser, "status"), what="the status after the error")
    browser.find_element(By.ID, "sample").click()
    wait_for(lambda: text_of(browser, "image-name").startswith("sample"), what="the sample again")
    spacing = browser.find_element(By.ID, "spacing")  # a bad spacing was dropped silently at Separate
    spacing.clear()
    spacing.send_keys("-1\n")
    wait_for(lambda: "spacing must be 2 positive numbers" in text_of(browser, "message"), what="the spacing error")
    browser.find_element(By.ID, "separate").click()  # ran with the previous spacing, the message cleared
    wait_for(lambda: "spacing must be 2 positive numbers" in text_of(browser, "message"), what="the spacing error")
    time.sleep(4)  # the sample separates in about a second: it must not have run with the old spacing
    assert text_of(browser, "count") == "" and "spacing must be" in text_of(browser, "message")


def test_an_image_given_to_the_app_opens_with_its_spacing_unit_and_middle_plane(browser, tmp_path):
    """`declump app volume.tif` opened with an empty spacing box (Separate refused until one was typed, and a
    typed "1" ran an anisotropic volume as isotropic) at plane 0; an upload of the same file filled them in."""
    import tifffile
    from werkzeug.serving import make_server

    from gpu_pipeline.synthetic import make_touching_particles

    volume, _ = make_touching_particles((12, 48, 48), 8, spacing=(2.0, 0.5, 0.5), seed=5)
    tifffile.imwrite(tmp_path / "vol.tif", volume, imagej=True, resolution=(2.0, 2.0),
                     metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})
    app = create_app(tmp_path / "vol.tif")
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        open_page(browser, f"http://127.0.0.1:{server.server_port}/")
        value = "return document.getElementById('{}').value"
        wait_for(lambda: browser.execute_script(value.format("spacing")) == "2,0.5,0.5", what="the file's spacing")
        assert browser.execute_script(value.format("unit")) in ("um", "µm")
        wait_for(lambda: text_of(browser, "plane-label") == "plane (z): 6 of 0-11", what="the middle plane")
    finally:
        server.shutdown()
        thread.join(10)


def test_a_job_s_end_is_shown_when_the_reply_showing_it_is_overtaken(served, browser, monkeypatch):
    """On a 4096^2 image the reply that showed a job's end took longer than the poll's 400 ms; the page kept
    the next poll's reply instead, and the status stayed at "separating particles ... 111 s" with no result.
    Here the first picture drawn after the separation ended takes 1.5 s: the status still ends as "separated
    in", with the count."""
    from gpu_pipeline.app import ui

    drawn = ui.build_figure
    slow = {"done": False}

    def build_figure(session, *args):
        if session.result is not None and session.job is None and not slow["done"]:
            slow["done"] = True
            time.sleep(1.5)
        return drawn(session, *args)

    monkeypatch.setattr(ui, "build_figure", build_figure)
    app, url = served
    open_page(browser, url)
    browser.find_element(By.ID, "sample").click()
    wait_for(lambda: text_of(browser, "image-name").startswith("sample"), what="the sample to load")
    browser.find_element(By.ID, "separate").click()
    wait_for(lambda: "separated in" in text_of(browser, "status"),
             what=lambda: f"the end to be shown (status {text_of(browser, 'status')!r})", timeout=30)
    assert slow["done"] and text_of(browser, "count").endswith("particles")


def test_a_separation_refused_for_its_settings_leaves_no_result_of_others_on_the_page(served, browser):
    """A value the option parser refuses (min distance "abc", spacing 0) said so in the message while the
    count, table and histogram of the earlier settings stayed, as if they were this one's."""
    separated_sample(browser, served[1])
    box = browser.find_element(By.ID, "min-distance")
    box.clear()
    box.send_keys("abc")
    browser.find_element(By.ID, "separate").click()
    wait_for(lambda: "--min-distance" in text_of(browser, "message"), what="the refusal")
    wait_for(lambda: text_of(browser, "count") == "", what=lambda: f"no count (page: {text_of(browser, 'count')!r})")
    assert "separated in" not in text_of(browser, "status")  # (it stayed, beside the refusal)
    assert not browser.find_elements(By.CSS_SELECTOR, "#table td.dash-cell")


def test_the_particle_named_under_the_graph_is_forgotten_with_its_result(served, browser, tmp_path, rng):
    """Hovering a particle names it and highlights its row; after another separation the page still named
    "particle 43" with the old result's diameter, and kept the row highlighted, though label 43 was another
    particle now."""
    from scipy import ndimage as ndi

    from gpu_pipeline.synthetic import make_touching_particles

    app, url = served
    open_page(browser, url)
    image, _ = make_touching_particles((256, 256), 40, radius_range=(8, 16), seed=int(rng.integers(1e6)))
    np.save(tmp_path / "hovered.npy", image)
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(tmp_path / "hovered.npy"))
    wait_for(lambda: text_of(browser, "image-name").startswith("hovered.npy"), what="the image to load")
    browser.find_element(By.ID, "separate").click()
    wait_for(lambda: text_of(browser, "count").endswith("particles"), what="the first separation")
    session = app_session(app, "hovered.npy")
    labels = session.result.labels
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    label = int(np.argmax(sizes))
    row, col = np.unravel_index(np.argmax(ndi.distance_transform_edt(labels == label)), labels.shape)
    area = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#graph .nsewdrag"), what="the plot area")
    box = area.rect
    x = int(round((col + 0.5) / labels.shape[1] * box["width"] - box["width"] / 2))
    y = int(round((row + 0.5) / labels.shape[0] * box["height"] - box["height"] / 2))
    for dx in (0, 1, 0):  # (a move onto the point the pointer is on already fires no hover)
        ActionChains(browser).move_to_element_with_offset(area, x + dx, y).perform()
    wait_for(lambda: text_of(browser, "hovered").startswith(f"particle {label}:"),
             what=lambda: f"the hover line (page: {text_of(browser, 'hovered')!r})")
    box = browser.find_element(By.ID, "min-distance")
    box.clear()
    box.send_keys("3")
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "separate")).click().perform()
    wait_for(lambda: session.result is not None and "--min-distance" in session.result.argv
             and text_of(browser, "count").endswith("particles") and text_of(browser, "hovered") == "",
             what=lambda: f"the hover line cleared (page: {text_of(browser, 'hovered')!r})")
    assert not browser.find_elements(By.CSS_SELECTOR, "#table td.dash-cell[style*='font-weight: bold']")


def test_a_separation_refused_for_its_classifier_leaves_no_result_on_the_page(served, browser):
    """Separate with the painted classifier before any training: the message said "train ... first" while the
    automatic result before it stayed, with its count and table, and the downloads gave it."""
    separated_sample(browser, served[1])
    choose(browser, "foreground", "classifier")
    browser.find_element(By.ID, "separate").click()
    wait_for(lambda: "train the classifier" in text_of(browser, "message"),
             what=lambda: f"the refusal (page: {text_of(browser, 'message')!r})")
    wait_for(lambda: text_of(browser, "count") == "", what=lambda: f"no count (page: {text_of(browser, 'count')!r})")
    assert not browser.find_elements(By.CSS_SELECTOR, "#table td.dash-cell")
    browser.find_element(By.ID, "get-labels").click()  # and no labels of the result before to download
    wait_for(lambda: "separate first" in text_of(browser, "message"),
             what=lambda: f"the download refused (page: {text_of(browser, 'message')!r})")


def test_an_emptied_brush_box_shows_the_width_the_strokes_get(served, browser):
    """Typing 30 in the brush slider's box, then emptying it: the thumb stayed at 30 while new strokes were drawn
    6 px wide (the emptied box gives None, drawn as the default). The slider now shows the default it draws."""
    from gpu_pipeline.app.ui import DEFAULT_BRUSH

    open_page(browser, served[1])
    browser.find_element(By.ID, "sample").click()
    wait_for(lambda: text_of(browser, "image-name").startswith("sample"), what="the sample to load")
    width = "return document.querySelector('#graph .js-plotly-plot')._fullLayout.newshape.line.width"
    box = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#brush input"), what="the brush's box")
    drawn = {}
    for typed in ("30", ""):
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(typed, Keys.TAB)
        expected = typed or str(DEFAULT_BRUSH)
        wait_for(lambda: box.get_attribute("value") == expected,
                 what=lambda: f"the box at {expected} (page: {box.get_attribute('value')!r})")
        time.sleep(0.5)
        drawn[expected] = browser.execute_script(width)
    assert drawn["30"] == pytest.approx(5 * drawn[str(DEFAULT_BRUSH)]), drawn

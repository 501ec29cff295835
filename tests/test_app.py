"""emo-app: the generation handler (clips streamed, input checked before the model, a stopped job leaves no file)
and the page itself, driven in headless Chromium from the OS packages (Selenium + chromium-driver).

The browser test is never silently skipped in CI (CI=true): a missing Chromium fails it. On a machine without
Chromium it is skipped with the install command as the reason.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import math
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import wave
from fractions import Fraction
from pathlib import Path

import av
import pytest

from emo_pipeline.app import PipelineHolder, build_demo, generate
from emo_pipeline.audio import load_audio
from emo_pipeline.errors import EMOInputError
from emo_pipeline.testing import demo_assets
from emo_pipeline.watermark import detect_watermark_in_file, read_ai_metadata

PORTRAIT, SPEECH = demo_assets()
ARTIFACTS = os.environ.get("EMO_APP_SCREENSHOT_DIR")  # set to keep the screenshot (e.g. for docs/)


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory):
    """The first 0.6 s of the bundled speech: 15 frames at 25 fps, two clips of 12."""
    path = tmp_path_factory.mktemp("audio") / "short.wav"
    with wave.open(str(SPEECH)) as source, wave.open(str(path), "wb") as target:
        target.setparams(source.getparams())
        target.writeframes(source.readframes(int(source.getframerate() * 0.6)))
    return path


@pytest.fixture(scope="module")
def holder():
    return PipelineHolder(None)  # the tiny demo pipeline, loaded on first use and shared by these tests


def video_facts(path):
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
        return frames, len(container.streams.audio)


def test_each_clip_is_shown_before_the_video_ends_and_the_final_mp4_follows_the_audio(holder, short_speech, tmp_path):
    seen = []

    def progress(value, desc=None):
        seen.append((value, desc))

    updates = []
    for update in generate(
        holder, tmp_path, str(PORTRAIT), str(short_speech), "", 2, 3.5, 0, 64, 0, "euler", progress
    ):
        latest, final, download, status = update
        updates.append(update)
        if final is None:  # a clip: its preview is playable now, while the rest is still to come
            frames, audio_streams = video_facts(latest)
            assert audio_streams == 1 and frames in (12, 3)
        else:
            assert video_facts(final) == (15, 1) and download == final
            assert detect_watermark_in_file(final).found and read_ai_metadata(final)
            assert "Random demo weights" in status
    assert [u[1] is None for u in updates] == [True, True, False]  # clip 1, clip 2, then the whole video
    assert seen[0] == ((1, 4), "clip 1/2, step 1/2") and seen[-1] == ((4, 4), "clip 2/2, step 2/2")
    assert list(tmp_path.iterdir()) == []  # the job folder is gone once Gradio has copied what it shows


def test_a_stopped_job_leaves_no_file(holder, short_speech, tmp_path):
    job = generate(holder, tmp_path, str(PORTRAIT), str(short_speech), "", 1, 3.5, 0, 64, 0, "model default")
    next(job)  # first clip shown
    assert len(list(tmp_path.iterdir())) == 1  # the job's folder, with the partial mp4 and the clip
    job.close()  # what Gradio does when Stop is pressed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("case", "message"),
    [("text_audio", "could not be decoded as audio"), ("no_audio", "no audio given"), ("no_image", "no portrait")],
)
def test_bad_input_is_an_error_before_the_model_is_loaded(tmp_path, case, message):
    class NoModel(PipelineHolder):
        def get(self, model):
            raise AssertionError("the model was loaded before the inputs were checked")

    text = tmp_path / "notes.wav"
    text.write_text("not audio\n")
    image, audio = str(PORTRAIT), {"text_audio": str(text), "no_audio": None, "no_image": str(SPEECH)}[case]
    if case == "no_image":
        image = None
    with pytest.raises(EMOInputError, match=message):
        next(generate(NoModel(), tmp_path, image, audio, "", 1, 3.5, 0, 64, 0, "model default"))


def test_only_a_private_page_lets_visitors_pick_the_model():
    def model_box(demo):
        (box,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model"]
        return box

    assert model_box(build_demo("some/model")).interactive is True
    assert model_box(build_demo("some/model", model_editable=False)).interactive is False


def test_the_page_shows_the_notices_and_the_demo_warning():
    demo = build_demo(None)
    text = " ".join(str(block.value) for block in demo.blocks.values() if type(block).__name__ == "Markdown")
    assert "RANDOM weights" in text and "NOISE" in text
    assert "consent" in text and "watermark" in text and "AI-generated" in text
    assert "RANDOM weights" not in " ".join(
        str(block.value) for block in build_demo("some/model").blocks.values() if type(block).__name__ == "Markdown"
    )


def test_stop_ends_the_running_job_within_a_step_and_generations_never_overlap(holder, short_speech, tmp_path):
    """Two visitors' jobs on one pipeline from two threads (as Gradio runs them): the second waits for the first;
    a Stop of the first ends it at its next step, leaves no file, and only then does the second start."""
    import threading

    steps_seen = []  # (job, time) of every denoising step: the spy

    def spy(job):
        return lambda value, desc=None: steps_seen.append((job, time.monotonic()))

    def run(job, steps, results):
        try:
            for update in generate(
                holder,
                tmp_path / job,
                str(PORTRAIT),
                str(short_speech),
                "",
                steps,
                3.5,
                0,
                64,
                0,
                "euler",
                spy(job),
                session=job,
            ):
                results.append(update)
        except Exception as error:  # noqa: BLE001 - recorded for the assertions
            results.append(error)

    for job in ("a", "b"):
        (tmp_path / job).mkdir()
    results = {"a": [], "b": []}
    first = threading.Thread(target=run, args=("a", 60, results["a"]))
    first.start()
    deadline = time.monotonic() + 120
    while sum(job == "a" for job, _ in steps_seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    second = threading.Thread(target=run, args=("b", 2, results["b"]))
    second.start()
    time.sleep(0.5)
    assert not any(job == "b" for job, _ in steps_seen)  # waits while "a" runs
    steps_before = sum(job == "a" for job, _ in steps_seen)
    assert holder.gate.request_stop("a")
    first.join(60)
    second.join(120)
    a_steps = [t for job, t in steps_seen if job == "a"]
    b_steps = [t for job, t in steps_seen if job == "b"]
    assert len(a_steps) <= steps_before + 1 < 2 * 60  # stopped within a step, long before its 120 steps
    assert min(b_steps) > max(a_steps)  # no step of "b" while "a" ran
    assert type(results["a"][-1]).__name__ == "JobStopped" and list((tmp_path / "a").iterdir()) == []
    assert results["b"][-1][1] is not None and "Done: 15 frames" in results["b"][-1][3]


@pytest.fixture(scope="module")
def two_hour_track(tmp_path_factory):
    """Two hours of silence as AAC at 8 kHz (0.5 MB; ~5 s to encode)."""
    import numpy as np

    path = tmp_path_factory.mktemp("long") / "two-hours.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000, layout="mono")
        stream.bit_rate = 8000
        block = np.zeros((1, 80000), np.float32)
        for index in range(720):
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, index * 80000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_uploads_are_bounded_before_they_are_decoded(tmp_path, two_hour_track):
    class NoModel(PipelineHolder):
        def get(self, model):
            raise AssertionError("the model was loaded before the inputs were checked")

    def first(audio, **limits):
        return next(generate(NoModel(), tmp_path, str(PORTRAIT), str(audio), "", 1, 3.5, 0, 64, 0, "euler", **limits))

    start = time.monotonic()
    with pytest.raises(EMOInputError, match=r"audio 'two-hours.m4a' lasts 120.0 min, longer than .* 300 s"):
        first(two_hour_track)
    assert time.monotonic() - start < 2.0  # from the header: the two hours were not decoded
    with pytest.raises(
        EMOInputError, match=r"portrait 'portrait.png' is 0.4 MB, more than this server's limit of 0.3 MB"
    ):
        first(SPEECH, max_upload_mb=0.3)
    picture = tmp_path / "photo.wav"
    picture.write_bytes(PORTRAIT.read_bytes())  # an upload that is not audio
    with pytest.raises(EMOInputError, match="photo.wav' has no audio stream"):
        first(picture)
    assert list(tmp_path.iterdir()) == [picture]  # no job folder, no output


def test_login_options_and_the_open_page_warning(tmp_path, caplog, monkeypatch):
    import gradio

    from emo_pipeline import app
    from emo_pipeline.app_safety import read_auth

    logins = tmp_path / "logins.txt"
    logins.write_text("# visitors\nann:pw1\n\nbob:pw:2\n")
    assert read_auth("me:secret", str(logins)) == [("me", "secret"), ("ann", "pw1"), ("bob", "pw:2")]
    assert read_auth(None, None) is None
    for bad, message in (("nopassword", "expected user:password"), (":pw", "expected user:password")):
        with pytest.raises(EMOInputError, match=message):
            read_auth(bad, None)
    launched = {}
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    with caplog.at_level("WARNING"):
        assert app.main(["--host", "0.0.0.0", "--no-preload"]) == 0
    assert "has no login" in caplog.text and launched["auth"] is None
    assert launched["max_file_size"] == "50mb"
    caplog.clear()
    assert app.main(["--host", "0.0.0.0", "--no-preload", "--auth-file", str(logins)]) == 0
    assert "has no login" not in caplog.text and launched["auth"] == [("ann", "pw1"), ("bob", "pw:2")]
    assert app.main(["--no-preload", "--auth", "nopassword"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# The page in a real browser
# ----------------------------------------------------------------------------------------------------------------


def _browser_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "headless Chromium not installed: apt-get install -y chromium chromium-driver"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (.ci/run installs it; the browser test must run in CI)")
    pytest.skip(reason)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(tmp_path_factory, *options):
    """`emo-app` with the tiny demo model on 127.0.0.1, as a user starts it; yields (url, its TMPDIR, its log)."""
    _browser_paths()
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "server.log"
    server_tmp = tmp_path_factory.mktemp("server_tmp")  # the server's job folders live here: the tests look in
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(server_tmp)}
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "emo_pipeline.app", "--host", "127.0.0.1", "--port", str(port), *options],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"emo-app did not start:\n{log.read_text()}")
        time.sleep(0.5)
    yield url, server_tmp, log
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    yield from _start_server(tmp_path_factory)


def _open_page(url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="emo-chromium-")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # this page and nothing else
    ):
        options.add_argument(argument)
    page = webdriver.Chrome(service=Service(driver), options=options)
    page.set_page_load_timeout(60)
    page.get(url)
    page.emo_profile = profile
    return page


def _close_page(page):
    page.quit()
    shutil.rmtree(page.emo_profile, ignore_errors=True)


@pytest.fixture
def browser(app_server):
    page = _open_page(app_server[0])
    yield page
    _close_page(page)


@pytest.fixture
def second_browser(app_server):
    """Another visitor: a second Chromium with its own profile (its own Gradio session)."""
    page = _open_page(app_server[0])
    yield page
    _close_page(page)


def _wait(condition, timeout, what, page):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; page text:\n{page.find_element('tag name', 'body').text}")


def _upload(page, element_id, path):
    from selenium.webdriver.common.by import By

    _wait(lambda: page.find_elements(By.CSS_SELECTOR, f"#{element_id} input[type=file]"), 60, element_id, page)
    page.find_element(By.CSS_SELECTOR, f"#{element_id} input[type=file]").send_keys(str(path))


@pytest.mark.slow
def test_in_a_browser_upload_generate_watch_and_download(browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = browser
    _wait(lambda: page.find_elements(By.ID, "generate"), 60, "the page", page)
    body = page.find_element(By.TAG_NAME, "body").text
    assert "consent" in body and "watermark" in body and "RANDOM weights" in body

    _upload(page, "portrait", PORTRAIT)
    _upload(page, "audio", SPEECH)
    _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#portrait img"), 60, "the portrait preview", page)
    _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#audio button, #audio audio"), 60, "the audio player", page)
    page.find_element(By.ID, "generate").click()

    _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#latest video"), 240, "the first clip", page)
    links = _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#download a[href]"), 300, "the mp4 link", page)
    assert page.find_elements(By.CSS_SELECTOR, "#final video")
    assert "Done: 85 frames" in page.find_element(By.ID, "status").text

    screenshot = tmp_path / "emo-app.png"
    page.execute_script("window.scrollTo(0, 0)")
    page.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if ARTIFACTS:
        Path(ARTIFACTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(ARTIFACTS) / "emo-app.png")

    downloaded = tmp_path / "downloaded.mp4"
    with urllib.request.urlopen(links[0].get_attribute("href"), timeout=60) as response:
        downloaded.write_bytes(response.read())
    frames, audio_streams = video_facts(downloaded)
    assert frames == math.ceil(Fraction(len(load_audio(SPEECH)), 16000) * 25) == 85  # the video follows the audio
    assert audio_streams == 1
    assert detect_watermark_in_file(downloaded).found and read_ai_metadata(downloaded)


@pytest.mark.slow
def test_in_a_browser_a_text_file_as_audio_shows_the_error_message(browser, tmp_path):
    """A text file with an audio name (a renamed file, an LFS pointer): the page's file picker accepts it by its
    name (a .txt is refused by the picker itself), and the server's message is shown, naming the file."""
    from selenium.webdriver.common.by import By

    page = browser
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    _upload(page, "portrait", PORTRAIT)
    _upload(page, "audio", text)
    _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#portrait img"), 60, "the portrait preview", page)
    time.sleep(1)
    page.find_element(By.ID, "generate").click()
    message = "audio file 'notes.wav' could not be decoded as audio"
    _wait(lambda: message in page.find_element(By.TAG_NAME, "body").text, 120, "the error message", page)
    body = page.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in body and "/tmp/" not in body


def _prepare(page, audio, steps=None):
    """Upload the portrait and `audio`; with `steps`, set the denoising steps in the Settings panel."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _upload(page, "portrait", PORTRAIT)
    _upload(page, "audio", audio)
    _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#portrait img"), 60, "the portrait preview", page)
    _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#audio button, #audio audio"), 60, "the audio player", page)
    if steps is not None:
        page.find_element(By.XPATH, "//button[contains(., 'Settings')]").click()
        box = _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#steps input[type=number]"), 30, "steps", page)[0]
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(steps), Keys.TAB)
        _wait(lambda: box.get_attribute("value") == str(steps), 10, f"steps = {steps}", page)


def _generations(log):
    """[(session, start, end, outcome)] and {session: stop time} from the server log's gate lines."""
    started, runs, stops = {}, [], {}
    for line in log.read_text().splitlines():
        if match := re.search(r"generation started: session (\S+) at ([\d.]+)", line):
            started[match[1]] = float(match[2])
        elif match := re.search(r"generation ended \((\w+)\): session (\S+) at ([\d.]+)", line):
            runs.append((match[2], started.pop(match[2]), float(match[3]), match[1]))
        elif match := re.search(r"stop requested: session (\S+)", line):
            stops[match[1]] = time.time()
    return sorted(runs, key=lambda run: run[1]), stops


def _assert_no_overlap(runs):
    for earlier, later in zip(runs, runs[1:]):
        assert later[1] >= earlier[2], f"two generations overlapped on one pipeline: {earlier} and {later}"


def _download(page, tmp_path, name):
    from selenium.webdriver.common.by import By

    link = page.find_element(By.CSS_SELECTOR, "#download a[href]").get_attribute("href")
    path = tmp_path / name
    with urllib.request.urlopen(link, timeout=60) as response:
        path.write_bytes(response.read())
    return path


@pytest.mark.slow
def test_in_a_browser_two_visitors_the_second_waits_and_both_get_their_video(
    browser, second_browser, app_server, short_speech, tmp_path
):
    from selenium.webdriver.common.by import By

    first, second = browser, second_browser
    _prepare(first, short_speech, steps=12)
    _prepare(second, short_speech)
    jobs = lambda: list(app_server[1].glob("emo-app-*/job-*"))  # noqa: E731
    first.find_element(By.ID, "generate").click()
    _wait(jobs, 120, "the first job to start", first)
    second.find_element(By.ID, "generate").click()
    # The second visitor is told it waits in the queue while the first job runs.
    _wait(lambda: "queue" in second.find_element(By.TAG_NAME, "body").text.lower(), 60, "queue position", second)
    for page, name in ((first, "first.mp4"), (second, "second.mp4")):
        _wait(lambda page=page: page.find_elements(By.CSS_SELECTOR, "#download a[href]"), 300, "the mp4", page)
        video = _download(page, tmp_path, name)
        assert video_facts(video) == (15, 1) and detect_watermark_in_file(video).found
    runs, _ = _generations(app_server[2])
    assert [run[3] for run in runs[-2:]] == ["finished", "finished"]
    _assert_no_overlap(runs)


@pytest.mark.slow
def test_in_a_browser_stop_ends_the_job_within_a_step_and_the_next_one_runs_alone(
    browser, second_browser, app_server, short_speech, tmp_path
):
    """A job of 2 clips x 100 steps (about a minute here) is stopped a few steps in, while another visitor's job
    waits: the stopped worker ends within a step, leaves no file, and the next job starts only after it."""
    from selenium.webdriver.common.by import By

    first, second = browser, second_browser
    _prepare(first, short_speech, steps=100)
    _prepare(second, short_speech)
    jobs = lambda: list(app_server[1].glob("emo-app-*/job-*"))  # noqa: E731
    first.find_element(By.ID, "generate").click()

    def past_step_2() -> bool:  # polled every 0.5 s: a step takes less, so "step 3/100" itself may never be seen
        steps = re.findall(r"step (\d+)/100", first.find_element(By.TAG_NAME, "body").text)
        return any(int(step) >= 3 for step in steps)

    _wait(past_step_2, 120, "step 3 of the long job", first)
    second.find_element(By.ID, "generate").click()
    _wait(lambda: "queue" in second.find_element(By.TAG_NAME, "body").text.lower(), 60, "queue position", second)
    first.find_element(By.ID, "stop").click()
    stopped_at = time.time()
    _wait(lambda: second.find_elements(By.CSS_SELECTOR, "#download a[href]"), 300, "the second video", second)
    assert video_facts(_download(second, tmp_path, "second.mp4")) == (15, 1)
    assert not first.find_elements(By.CSS_SELECTOR, "#download a[href]")  # the stopped job offered no video
    _wait(lambda: not jobs(), 60, "the job folders to be removed", first)
    runs, stops = _generations(app_server[2])
    stopped, after = runs[-2], runs[-1]
    assert stopped[3] == "stopped" and after[3] == "finished"
    assert stopped[2] - stopped_at < 5.0  # a step here is ~0.3 s; the whole job would have taken ~60 s more
    _assert_no_overlap(runs)


@pytest.fixture(scope="module")
def auth_server():
    """The page with a login, served from this process (no model is loaded: only the login is tested)."""
    _browser_paths()
    port = _free_port()
    demo = build_demo(None)
    demo.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=port, auth=[("visitor", "s3cret")], prevent_thread_lock=True, quiet=True
    )
    yield (f"http://127.0.0.1:{port}/",)
    demo.close()


def test_only_the_job_folders_and_uploads_are_served(app_server):
    for path in ("/etc/passwd", os.path.abspath(__file__)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{app_server[0]}gradio_api/file={path}", timeout=30)
        assert refused.value.code in (403, 404)


@pytest.mark.slow
def test_in_a_browser_a_login_page_guards_the_app_when_auth_is_on(auth_server):
    from selenium.webdriver.common.by import By

    page = _open_page(auth_server[0])
    try:
        password = _wait(lambda: page.find_elements(By.CSS_SELECTOR, "input[type=password]"), 60, "login", page)[0]
        assert not page.find_elements(By.ID, "generate")  # nothing of the app before the login
        username = page.find_element(By.CSS_SELECTOR, "input[type=text]")
        username.send_keys("visitor")
        password.send_keys("wrong")
        page.find_element(By.XPATH, "//button[contains(., 'Login')]").click()
        _wait(lambda: "incorrect" in page.find_element(By.TAG_NAME, "body").text.lower(), 30, "refusal", page)
        assert not page.find_elements(By.ID, "generate")
        page.get(auth_server[0])  # a fresh login form
        password = _wait(lambda: page.find_elements(By.CSS_SELECTOR, "input[type=password]"), 60, "login", page)[0]
        page.find_element(By.CSS_SELECTOR, "input[type=text]").send_keys("visitor")
        password.send_keys("s3cret")
        page.find_element(By.XPATH, "//button[contains(., 'Login')]").click()
        _wait(lambda: page.find_elements(By.ID, "generate"), 60, "the app after logging in", page)
    finally:
        _close_page(page)


def test_the_face_analysis_field_reaches_the_pipeline(holder, short_speech, tmp_path):
    """The page's face-analysis folder (Hallo weights) is passed to the pipeline; the demo model (EMO weights)
    refuses it by name, and an empty field passes nothing. No file is left either way."""
    args = (holder, tmp_path, str(PORTRAIT), str(short_speech), "", 1, 3.5, 0, 64, 0, "model default")
    with pytest.raises(EMOInputError, match=r"\['face_analysis_dir'\] apply to Hallo"):
        next(generate(*args, face_analysis_dir=str(tmp_path / "face_analysis")))
    job = generate(*args, face_analysis_dir="  ")
    next(job)
    job.close()
    assert list(tmp_path.iterdir()) == []

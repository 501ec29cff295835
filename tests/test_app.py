"""emo-app: the generation handler (clips streamed, input checked before the model, a stopped job leaves no file)
and the page itself, driven in headless Chromium from the OS packages (Selenium + chromium-driver).

The browser test is never silently skipped in CI (CI=true): a missing Chromium fails it. On a machine without
Chromium it is skipped with the install command as the reason.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import math
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """`emo-app` with the tiny demo model on 127.0.0.1, as a user starts it."""
    _browser_paths()
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "server.log"
    server_tmp = tmp_path_factory.mktemp("server_tmp")  # the server's job folders live here: the tests look in
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(server_tmp)}
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "emo_pipeline.app", "--host", "127.0.0.1", "--port", str(port)],
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
    yield url, server_tmp
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture
def browser(app_server):
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
    page.get(app_server[0])
    yield page
    page.quit()
    shutil.rmtree(profile, ignore_errors=True)


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


@pytest.mark.slow
def test_in_a_browser_stop_leaves_no_file(browser, app_server):
    from selenium.webdriver.common.by import By

    page = browser
    _upload(page, "portrait", PORTRAIT)
    _upload(page, "audio", SPEECH)
    _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#portrait img"), 60, "the portrait preview", page)
    _wait(lambda: page.find_elements(By.CSS_SELECTOR, "#audio button, #audio audio"), 60, "the audio player", page)
    page.find_element(By.ID, "generate").click()
    jobs = lambda: list(app_server[1].glob("emo-app-*/job-*"))  # noqa: E731
    _wait(jobs, 120, "the job to start", page)
    page.find_element(By.ID, "stop").click()
    _wait(lambda: not jobs(), 120, "the stopped job's files to be removed", page)
    assert not page.find_elements(By.CSS_SELECTOR, "#download a[href]")  # no video was offered


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

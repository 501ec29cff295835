"""The command line as a new user meets it: --help without torch, defaults shown, bad input reported before any
model loads, no native log noise, a labelled progress bar. (The --help time itself is in benchmarks/bench_cli.py.)"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
import subprocess
import sys
import wave

import pytest

from emo_pipeline.cli import _common, animate, preprocess
from emo_pipeline.testing import demo_assets

PORTRAIT, SPEECH = demo_assets()
NATIVE_NOISE_LINES = (
    "Created TensorFlow Lite XNNPACK delegate",
    "absl::InitializeLog()",
    "inference_feedback_manager",
)


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory):
    """The first 0.6 s of the bundled speech (15 frames at 25 fps: two clips of 12)."""
    path = tmp_path_factory.mktemp("audio") / "short.wav"
    with wave.open(str(SPEECH)) as source, wave.open(str(path), "wb") as target:
        target.setparams(source.getparams())
        target.writeframes(source.readframes(int(source.getframerate() * 0.6)))
    return path


def test_scheduler_choices_match_the_pipeline():
    from emo_pipeline.pipeline_emo import SCHEDULERS

    assert _common.SCHEDULER_NAMES == tuple(sorted(SCHEDULERS))


def test_help_imports_no_torch_diffusers_or_mediapipe():
    code = (
        "import sys\n"
        "from emo_pipeline.cli import animate, preprocess\n"
        "for parser in (animate.build_parser(), preprocess.build_parser()):\n"
        "    parser.format_help()\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'mediapipe', 'cv2') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", [animate, preprocess])
def test_help_gives_every_option_a_text_and_its_default_and_names_exit_codes(module):
    parser = module.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        if action.default not in (None, False):
            assert (
                f"default: {action.default:g}" in action.help
                if isinstance(action.default, float)
                else (f"default: {action.default}" in action.help)
            ), f"{action.option_strings} does not show its default {action.default!r}: {action.help!r}"
    assert "exit codes" in text and "example" in text
    assert not re.search(r"see .*(source|\.py)", text)  # no "see the source files"


def test_emo_animate_help_shows_the_model_defaults():
    text = animate.build_parser().format_help()
    assert "default: 512; demo model: 64" in " ".join(text.split())
    assert "default: 40; demo model: 4" in " ".join(text.split())


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("text_as_image", "is not an image file PIL can read"),
        ("missing_audio", "does not exist"),
        ("text_as_audio", "could not be decoded as audio"),
        ("no_output_folder", "does not exist; create it first"),
        ("no_face", "face_box"),
    ],
)
def test_bad_input_is_reported_before_any_model_loads(tmp_path, monkeypatch, capsys, case, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(_common, "load_pipeline", no_model)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not media\n")
    args = {"--image": str(PORTRAIT), "--audio": str(SPEECH), "--output": str(tmp_path / "out.mp4")}
    if case == "text_as_image":
        args["--image"] = str(text_file)
    elif case == "missing_audio":
        args["--audio"] = str(tmp_path / "missing.wav")
    elif case == "text_as_audio":
        args["--audio"] = str(text_file)
    elif case == "no_output_folder":
        args["--output"] = str(tmp_path / "no" / "such" / "out.mp4")
    else:
        from PIL import Image

        Image.new("RGB", (128, 128), (200, 200, 200)).save(tmp_path / "blank.png")
        args["--image"] = str(tmp_path / "blank.png")
    assert animate.main([token for pair in args.items() for token in pair]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("**/*.mp4"))


def test_demo_run_prints_no_native_log_lines_and_a_labelled_progress_bar(tmp_path, short_speech):
    """A fresh process, so mediapipe's graphs start (and would log) inside it."""
    output = tmp_path / "demo.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "emo_pipeline.cli.animate", "--image", str(PORTRAIT), "--audio", str(short_speech)]
        + ["--output", str(output), "--steps", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for line in NATIVE_NOISE_LINES:
        assert line not in result.stderr, f"native log line leaked to stderr: {line!r}\n{result.stderr}"
    assert "RANDOM weights" in result.stderr  # the demo notice is still said loudly
    assert re.search(r"clip 2/2 step 2/2 \|.*\| 4/4 steps \[.*ETA", result.stderr), result.stderr
    assert output.is_file() and "wrote" in result.stdout


def test_quiet_native_logs_drops_noise_and_keeps_errors(capfd):
    from emo_pipeline._native_log import quiet_native_logs

    with quiet_native_logs():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"W0000 00:00:1796108943.120904    7714 inference_feedback_manager.cc:114] Feedback manager\n")
        os.write(2, b"E0000 00:00:1796108943.120904    7714 graph.cc:1] a real native error\n")
        print("a Python message", file=sys.stderr)
    err = capfd.readouterr().err
    assert "a real native error" in err and "a Python message" in err
    assert not any(line in err for line in NATIVE_NOISE_LINES)


def test_quantize_choices_match_the_recipes():
    from emo_pipeline.quantization import QUANTIZATION_RECIPES

    assert _common.QUANTIZE_NAMES == QUANTIZATION_RECIPES


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--attention-backend", "warp"], "is not one of diffusers' backends"),
        (["--attention-backend", "sage"], "cannot run here"),  # sageattention is not installed (a GPU package)
        (["--compile", "whole", "--step-cache", "2"], "needs a hookable backbone"),
    ],
)
@pytest.mark.parametrize("tool", ["emo-animate", "batch", "emo-app"])
def test_bad_speed_switches_exit_2_before_any_model_loads(tmp_path, monkeypatch, capsys, options, message, tool):
    from emo_pipeline import app

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the switches were checked")

    monkeypatch.setattr(_common, "load_pipeline", no_model)
    monkeypatch.setattr(app, "load_pipeline", no_model)
    if tool == "emo-app":
        code = app.main(options)
    elif tool == "batch":
        jobs = tmp_path / "jobs.csv"
        jobs.write_text(f"image,audio,output\n{PORTRAIT},{SPEECH},{tmp_path / 'a.mp4'}\n")
        code = animate.main(["--jobs", str(jobs), *options])
    else:
        inputs = ["--image", str(PORTRAIT), "--audio", str(SPEECH), "--output", str(tmp_path / "o.mp4")]
        code = animate.main([*inputs, *options])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("**/*.mp4"))


@pytest.mark.parametrize("module", ["animate", "app"])
def test_a_bad_step_cache_or_choice_is_an_argparse_error(module, capsys):
    from emo_pipeline import app

    main = animate.main if module == "animate" else app.main
    for options in (["--step-cache", "0"], ["--compile", "fast"], ["--offload", "disk"], ["--quantize", "int2"]):
        with pytest.raises(SystemExit) as exit_info:
            main(options)
        assert exit_info.value.code == 2


def test_load_pipeline_applies_every_speed_switch():
    """The switches reach the pipeline: the backend on every processor, int8 weights, the step-cache default, model
    offload hooks, the UNets' blocks compiled (lazily: nothing is compiled until a call)."""
    import torch

    speed = _common.SpeedOptions(
        attention_backend="_native_math", compile="regional", quantize="int8", step_cache=2, offload="model"
    )
    try:
        pipe = _common.load_pipeline(None, device="cpu", speed=speed, notice=False)
        for model in (pipe.unet, pipe.reference_net):
            assert {p._attention_backend for p in model.attn_processors.values()} == {"_native_math"}
            names = model.spatial_layer_names if model is pipe.reference_net else model.reference_layer_names
            linear = model.get_submodule(names[0]).to_q
            assert type(linear.weight) is not torch.nn.Parameter  # torchao's int8 tensor
            blocks = [m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
            assert all(block._compiled_call_impl is not None for block in blocks)
        assert pipe.emo_metadata["generation_defaults"]["step_cache"] == 2
        assert getattr(pipe.unet, "_hf_hook", None) is not None  # accelerate's model offload hook
    finally:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_demo_run_with_speed_switches_writes_the_video(tmp_path, short_speech):
    output = tmp_path / "fast.mp4"
    code = animate.main(
        [
            "--image", str(PORTRAIT), "--audio", str(short_speech), "--output", str(output), "--no-progress",
            "--attention-backend", "_native_math", "--quantize", "int8", "--step-cache", "2", "--steps", "2",
        ]
    )  # fmt: skip
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    assert code == 0 and output.stat().st_size > 0

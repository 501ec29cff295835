"""Golden of EchoMimic's pose condition: its own landmark extractor and landmark renderer (not run in CI).

Runs EchoMimic's ``LMKExtractor`` (src/utils/mp_utils.py: mediapipe's Tasks face landmarker with EchoMimic's
bundled ``face_landmarker_v2_with_blendshapes.task``) and ``FaceMeshVisualizer(draw_iris=False, draw_mouse=False)
.draw_landmarks`` (src/utils/draw_utils.py, as ``infer_audio2vid_pose*.py`` build it) on a few frames of a tiny
synthetic driving video (the package's bundled portrait, moved and scaled, on a 160 x 120 grey frame), after the
crop and resize its scripts apply to driving frames (img_utils.py ``center_crop_cv2`` then ``cv2.resize`` to 512).
EchoMimic's code is imported at run time from ``--echomimic-src``, never copied here.

Recorded (``tests/goldens/echomimic/pose_golden.npz``, compressed):

* ``frames``: the driving frames, ``(N, 120, 160, 3)`` uint8 RGB (the inputs of both extractors);
* ``landmarks``: EchoMimic's extractor's landmarks ``(N, 478, 3)`` (normalised x, y; z) of each frame;
* ``render_512`` / ``render_96`` / ``render_80x64``: its renders of those landmarks, ``draw_landmarks((W, H),
  lmks[:, :2], normed=True)`` (``demo_motion_sync.py``'s call; the pose scripts' ``.pkl`` files hold the same
  landmarks in 512-pixel units, divided by (W, H) = 512 there);
* ``edge_landmarks`` / ``edge_render_512``: landmarks moved partly off the canvas and to its borders (the skipped
  points and the clipped pupil squares).

With ``--pipelines`` also ``tests/goldens/echomimic/pose_pipelines.safetensors``: EchoMimic's own pose pipelines
(``AudioPose2VideoPipeline`` of pipeline_echo_mimic_pose.py at CFG 2.5, 5 steps, and of
pipeline_echo_mimic_pose_acc.py at CFG 1.0, 6 steps) on make_echomimic_goldens.py's tiny random networks and inputs
(``run_pose_pipelines``): every frame's final latents (``pose/latents``, ``pose_acc/latents``, ``(1, 4, 33, 12,
12)``, taken at ``decode_latents``) and one decoded frame (``pose/frame16``).

Usage (EchoMimic's venv, see make_echomimic_goldens.py; plus mediapipe, as EchoMimic's requirements.txt)::

    /work/venvs/echomimic/bin/pip install --no-deps mediapipe==0.10.21
    /work/venvs/echomimic/bin/pip install absl-py attrs flatbuffers "protobuf<5" matplotlib
    /work/venvs/echomimic/bin/python tests/goldens/make_echomimic_pose_golden.py --echomimic-src /tmp/echomimic \
        --pipelines

Shims: ``img_utils.py`` imports IPython and imageio_ffmpeg (not installed), so its ``center_crop_cv2`` is executed
verbatim from the file's source with ``ast``; ``mp_utils`` and ``draw_utils`` import as released
(opencv-python-headless stands in for the opencv-contrib-python that mediapipe's wheel asks for: the same cv2);
the pipelines need make_echomimic_goldens.py's shim 1 (the guidance row mask on the CPU) and nothing else. Ran with
EchoMimic snapshot a53e970, diffusers 0.24.0, torch 2.13.0 CPU, fp32, 1 thread: about 20 s.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "tests" / "goldens" / "echomimic" / "pose_golden.npz"
PORTRAIT = ROOT / "emo_pipeline" / "assets" / "portrait.png"
# (x offset, y offset, face size) of the portrait in each 160 x 120 driving frame
PLACEMENTS = ((20, 0, 120), (30, -4, 124), (14, 6, 112))


def driving_frames() -> np.ndarray:
    """`(3, 120, 160, 3)` uint8 RGB: the portrait moved and scaled on grey (cv2 only, so either venv can build it)."""
    portrait = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    frames = []
    for dx, dy, size in PLACEMENTS:
        face = cv2.resize(portrait, (size, size), interpolation=cv2.INTER_AREA)
        shift = np.float32([[1, 0, dx], [0, 1, dy]])
        frames.append(cv2.warpAffine(face, shift, (160, 120), borderValue=(90, 90, 90)))
    return np.stack(frames)


def _own_function(path: Path, name: str):
    """EchoMimic's function `name`, executed verbatim from its file's source (the module imports IPython and
    imageio_ffmpeg, which its venv lacks)."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {"np": np, "cv2": cv2}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--echomimic-src", required=True, help="a checkout of github.com/antgroup/echomimic")
    parser.add_argument(
        "--pipelines", action="store_true", help="also run EchoMimic's pose pipelines (pose_pipelines.safetensors)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.echomimic_src).resolve()))
    from src.utils.draw_utils import FaceMeshVisualizer
    from src.utils.mp_utils import LMKExtractor

    center_crop_cv2 = _own_function(Path(args.echomimic_src) / "src" / "utils" / "img_utils.py", "center_crop_cv2")

    frames = driving_frames()
    extractor = LMKExtractor()
    visualizer = FaceMeshVisualizer(draw_iris=False, draw_mouse=False)  # infer_audio2vid_pose*.py
    landmarks = []
    for frame in frames:
        bgr = cv2.resize(center_crop_cv2(frame[:, :, ::-1]), (512, 512))  # pils_from_video + infer_*_pose_acc.py
        result = extractor(np.ascontiguousarray(bgr))
        assert result is not None, "EchoMimic's extractor found no face"
        landmarks.append(result["lmks"])
    landmarks = np.stack(landmarks)

    def render(size, marks):
        return np.stack([visualizer.draw_landmarks(size, m[:, :2], normed=True) for m in marks])

    rng = np.random.default_rng(0)
    edge = landmarks[:1, :, :2].repeat(3, axis=0).copy()
    edge[0, :, 0] += 0.998 - edge[0, 468, 0]  # the right pupil at the right border: points off the canvas
    edge[1] -= edge[1][468] - (0.001, 0.002)  # the right pupil at the top-left corner: negative slice starts
    edge[2] = rng.uniform(-0.1, 1.1, size=edge[2].shape)  # anywhere, some outside
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUTPUT,
        frames=frames,
        landmarks=landmarks.astype(np.float32),
        render_512=render((512, 512), landmarks),
        render_96=render((96, 96), landmarks),
        render_80x64=render((80, 64), landmarks),
        edge_landmarks=edge.astype(np.float32),
        edge_render_512=render((512, 512), edge),
    )
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1024:.0f} KB)")
    if args.pipelines:
        run_pose_pipelines(Path(args.echomimic_src).resolve(), landmarks, visualizer)


def run_pose_pipelines(src: Path, landmarks: np.ndarray, visualizer) -> None:
    """EchoMimic's own pose pipelines (pipeline_echo_mimic_pose.py at CFG 2.5, 5 steps; pipeline_echo_mimic_pose_acc
    .py at CFG 1.0, 6 steps) with the audio goldens' tiny networks and inputs (make_echomimic_goldens.py: weights
    regenerated from its recorded seed, its cropped portrait and track); the pose face locator = the golden's
    1-channel one with its first conv spread over 3 channels (`conv_in.weight.repeat(1, 3, 1, 1) / 3`, as
    tests/echomimic_goldens.py `write_release` builds the pose files). Pose renders: output frame i draws the
    extractor's landmarks of driving frame i % 3, `draw_landmarks((96, 96), lmks[:, :2], normed=True)` (the pose
    scripts' `.pkl` landmarks are in 512-pixel units divided by (W, H), i.e. normalised only at 512), stacked as
    infer_audio2vid_pose.py:186-195 stacks them. Shim 1 of make_echomimic_goldens.py (guidance mask on the CPU)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler
    from omegaconf import OmegaConf
    from PIL import Image
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).parent))
    import make_echomimic_goldens as audio_goldens
    import src.models.mutual_self_attention as msa
    from echomimic_weights import random_state_dict
    from src.models.face_locator import FaceLocator
    from src.models.unet_2d_condition import UNet2DConditionModel
    from src.models.unet_3d_echo import EchoUNet3DConditionModel
    from src.models.whisper.audio2feature import Audio2Feature
    from src.models.whisper.whisper.model import ModelDimensions, Whisper
    from src.pipelines.pipeline_echo_mimic_pose import AudioPose2VideoPipeline
    from src.pipelines.pipeline_echo_mimic_pose_acc import AudioPose2VideoPipeline as AccPosePipeline

    torch.set_num_threads(1)
    hooks = msa.ReferenceAttentionControl.register_reference_hooks
    hooks.__defaults__ = tuple(torch.device("cpu") if isinstance(d, torch.device) else d for d in hooks.__defaults__)
    golden = OUTPUT.parent
    meta = json.loads((golden / "metadata.json").read_text())
    state = random_state_dict(meta["weight_spec"], meta["weight_seed"])
    state.update(load_file(str(golden / "buffers.safetensors")))
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    inputs = load_file(str(golden / "outputs.safetensors"))
    infer_config = OmegaConf.load(src / "configs/inference/inference_v2.yaml")
    config = audio_goldens.TINY_UNET_CONFIG
    base = golden / "tmp_pose_base" / "unet"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(config))
    save_file(UNet2DConditionModel.from_config(config).state_dict(), str(base / "diffusion_pytorch_model.safetensors"))
    reference_unet = UNet2DConditionModel.from_config(config)
    reference_unet.load_state_dict(part("reference_unet."))
    denoising_unet = EchoUNet3DConditionModel.from_pretrained_2d(
        str(base.parent),
        "",
        subfolder="unet",
        unet_additional_kwargs=OmegaConf.to_container(infer_config.unet_additional_kwargs),
    )
    denoising_unet.load_state_dict(part("denoising_unet."))
    locator_state = part("face_locator.")
    locator_state["conv_in.weight"] = locator_state["conv_in.weight"].repeat(1, 3, 1, 1) / 3
    face_locator = FaceLocator(
        config["block_out_channels"][0],
        conditioning_channels=3,
        block_out_channels=audio_goldens.FACE_LOCATOR_CHANNELS,
    )
    face_locator.load_state_dict(locator_state)
    vae = AutoencoderKL.from_config(audio_goldens.TINY_VAE_CONFIG)
    vae.load_state_dict(part("vae."))
    whisper = Whisper(ModelDimensions(**audio_goldens.TINY_WHISPER_DIMS))
    whisper.encoder.load_state_dict(part("whisper.encoder."))
    for model in (reference_unet, denoising_unet, face_locator, vae, whisper):
        model.eval()
    audio_guider = Audio2Feature.__new__(Audio2Feature)
    audio_guider.whisper_model_type, audio_guider.model = "tiny", whisper
    audio = inputs["audio"].numpy()
    frames = audio_guider.feature2chunks(feature_array=audio_guider.audio2feat(audio), fps=audio_goldens.FPS).shape[0]
    size = audio_goldens.SIZE
    pose_list = []
    for index in range(frames):  # infer_audio2vid_pose.py:186-195
        tgt_musk = visualizer.draw_landmarks((size, size), landmarks[index % len(landmarks), :, :2], normed=True)
        tgt_musk_pil = Image.fromarray(np.array(tgt_musk).astype(np.uint8)).convert("RGB")
        pose_list.append(torch.Tensor(np.array(tgt_musk_pil)).permute(2, 0, 1) / 255.0)
    face_mask_tensor = torch.stack(pose_list, dim=1).unsqueeze(0)
    ref_image_pil = Image.fromarray(inputs["face_img_bgr"].numpy()[:, :, [2, 1, 0]])
    tensors = {}
    for run, (cls, steps, cfg) in {
        "pose": (AudioPose2VideoPipeline, 5, 2.5),
        "pose_acc": (AccPosePipeline, 6, 1.0),
    }.items():
        pipe = cls(
            vae=vae,
            reference_unet=reference_unet,
            denoising_unet=denoising_unet,
            audio_guider=audio_guider,
            face_locator=face_locator,
            scheduler=DDIMScheduler(**OmegaConf.to_container(infer_config.noise_scheduler_kwargs)),
        )
        decode, final = pipe.decode_latents, []
        pipe.decode_latents = lambda latents, decode=decode, final=final: (
            final.append(latents.clone()) or decode(latents)
        )
        with torch.no_grad():
            video = pipe(
                ref_image_pil,
                audio,
                face_mask_tensor,
                size,
                size,
                1200,
                steps,
                cfg,
                generator=torch.manual_seed(audio_goldens.SEED),
                audio_sample_rate=16000,
                context_frames=audio_goldens.CONTEXT_FRAMES,
                fps=audio_goldens.FPS,
                context_overlap=audio_goldens.CONTEXT_OVERLAP,
            ).videos
        tensors[f"{run}/latents"] = final[0].contiguous()  # (1, 4, F, h, w): every frame's final latents
        if run == "pose":  # one decoded frame (the VAE's own parity is in the audio goldens)
            tensors[f"{run}/frame16"] = video[0, :, 16].contiguous()
        print(run, tuple(video.shape), flush=True)
    save_file(tensors, str(golden / "pose_pipelines.safetensors"))
    import shutil

    shutil.rmtree(golden / "tmp_pose_base")
    print("wrote", golden / "pose_pipelines.safetensors")


if __name__ == "__main__":
    main()

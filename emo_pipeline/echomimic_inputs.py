"""EchoMimic's front end: face box -> crop and mask, whisper-tiny features per frame (docs/echomimic_architecture.md).

Everything here reproduces EchoMimic's own preprocessing (antgroup/echomimic, `infer_audio2vid.py` and
`src/models/whisper/`), with `transformers`' `WhisperEncoder` in place of EchoMimic's copy of openai-whisper.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (diffusers' loader looks the base classes up in this module)
from transformers import PreTrainedModel  # noqa: F401
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from emo_pipeline.errors import EMOInputError

__all__ = [
    "WHISPER_TINY_DIMS",
    "WhisperAudioEncoder",
    "convert_whisper_checkpoint",
    "echomimic_face_crop",
    "echomimic_frame_count",
    "load_whisper_encoder",
    "select_face",
    "whisper_frame_tokens",
    "whisper_log_mel",
    "whisper_features",
]

SAMPLE_RATE = 16000
N_FFT, HOP, SEGMENT = 400, 160, 3000  # whisper: 25 ms window, 10 ms hop, 30 s (3000 mel frames) per encoder call
FEATURE_RATE = 50  # encoder steps per second
WINDOW_BEFORE, WINDOW_AFTER = 2, 2  # audio2feature.py get_sliced_feature(audio_feat_length=[2, 2]): 2x2 + 3x2 steps
# whisper-tiny's encoder (openai's `dims`): EchoMimic's feature width 384 is hard-coded (audio2feature.py:49).
WHISPER_TINY_DIMS = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6}


class WhisperAudioEncoder(WhisperEncoder):
    """transformers' `WhisperEncoder` (the encoder of `WhisperModel`) under a name diffusers can import from this
    module when it loads a saved pipeline (transformers does not export `WhisperEncoder` at its top level)."""


# ------------------------------------------------------------------------------------------------------- face


def select_face(boxes, probs) -> np.ndarray | None:
    """EchoMimic's choice among detections (infer_audio2vid.py `select_face`): the largest box with prob > 0.8."""
    if boxes is None or probs is None:
        return None
    kept = [np.asarray(box) for box, prob in zip(boxes, probs) if prob > 0.8]
    if not kept:
        return None
    return max(kept, key=lambda b: (b[3] - b[1]) * (b[2] - b[0]))  # max keeps the first of equal areas, as sorted


def _square_crop(image: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """EchoMimic's `crop_and_pad` (src/utils/util.py): the largest centred square inside `rect`, clamped."""
    x0, y0, x1, y1 = rect
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    side = min(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    nx0, ny0 = max(0, cx - side // 2), max(0, cy - side // 2)
    nx1, ny1 = min(w, nx0 + side), min(h, ny0 + side)
    if nx1 - nx0 != ny1 - ny0:
        side = min(nx1 - nx0, ny1 - ny0)
        nx1, ny1 = nx0 + side, ny0 + side
    return image[ny0:ny1, nx0:nx1]


def echomimic_face_crop(
    image: np.ndarray,
    box,
    width: int = 512,
    height: int = 512,
    mask_ratio: float = 0.1,
    crop_ratio: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Portrait `(H, W, 3)` uint8 + face box `(x0, y0, x1, y1)` in its pixels -> `(crop (height, width, 3), mask
    (height, width) uint8 0/255)`, exactly as infer_audio2vid.py:200-223: the box rounded, the mask = the box grown
    by `mask_ratio` of its size on each side, the crop = the box grown by `crop_ratio`, clamped to the image, the
    largest centred square of that, both resized with cv2's INTER_LINEAR.
    """
    import cv2

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise EMOInputError(f"portrait must be an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    box = np.asarray(box, dtype=np.float64).reshape(-1)
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise EMOInputError(f"face_box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box.tolist()}")
    x0, y0, x1, y1 = np.round(box).astype(int)
    if x1 <= 0 or y1 <= 0 or x0 >= image.shape[1] or y0 >= image.shape[0]:
        raise EMOInputError(
            f"face_box {box.tolist()} lies outside the portrait ({image.shape[1]} x {image.shape[0]} pixels); give "
            "it in the portrait's own pixel coordinates"
        )
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    r_pad, c_pad = int((y1 - y0) * mask_ratio), int((x1 - x0) * mask_ratio)
    # negative starts wrap in numpy slicing, as in EchoMimic (a box at the edge: its quirk, kept)
    mask[y0 - r_pad : y1 + r_pad, x0 - c_pad : x1 + c_pad] = 255
    r_crop, c_crop = int((y1 - y0) * crop_ratio), int((x1 - x0) * crop_ratio)
    rect = (
        max(0, x0 - c_crop),
        max(0, y0 - r_crop),
        min(x1 + c_crop, image.shape[1]),
        min(y1 + r_crop, image.shape[0]),
    )
    crop = cv2.resize(_square_crop(image, rect), (width, height))
    mask = cv2.resize(_square_crop(mask, rect), (width, height))
    return crop, mask


def detect_face_box(image_bgr: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray | None:
    """EchoMimic's detector: facenet-pytorch's MTCNN with its settings (infer_audio2vid.py:160), given the array as
    EchoMimic gives it (BGR, from cv2.imread), and its choice (`select_face`). facenet-pytorch pins torch<2.3 (install
    it with --no-deps) and needs a torchvision that imports beside the installed torch; when it cannot be used this is
    an `EMOInputError` saying so (PyPI's torchvision does not import beside torch 2.13: pass `face_box=` there)."""
    try:
        from facenet_pytorch import MTCNN
    except Exception as error:  # not installed, or its torchvision does not import beside this torch
        raise EMOInputError(
            "EchoMimic's face detector (facenet-pytorch's MTCNN) cannot be used here "
            f"({type(error).__name__}: {str(error)[:120]}): install facenet-pytorch with --no-deps and a torchvision "
            "matching your torch, or pass face_box=(x0, y0, x1, y1) in the portrait's pixels"
        ) from error
    detector = MTCNN(
        image_size=320,
        margin=0,
        min_face_size=20,
        thresholds=[0.6, 0.7, 0.7],
        factor=0.709,
        post_process=True,
        device=device,
    )
    boxes, probs = detector.detect(image_bgr)
    return select_face(boxes, probs)


def fallback_face_box(image_rgb: np.ndarray) -> np.ndarray | None:
    """The largest face of mediapipe's detector (`emo_pipeline.face.detect_faces`): fast mode's box when MTCNN is
    unavailable. Not EchoMimic's detector: boxes differ by a few pixels, so frames differ from EchoMimic's."""
    from emo_pipeline.face import detect_faces

    faces = detect_faces(image_rgb)
    return np.asarray(faces.boxes[0], dtype=np.float64) if len(faces.boxes) else None


# ------------------------------------------------------------------------------------------------------ audio


def _mel_filters() -> torch.Tensor:
    """whisper's 80 x 201 mel filter bank (librosa's slaney filters, as transformers' WhisperFeatureExtractor)."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=80,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(bank.T.astype(np.float32))


def whisper_log_mel(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The log-mel of the whole track `(80, n)`, normalised over the whole track as EchoMimic's whisper copy does
    (whisper/audio.py `log_mel_spectrogram`: max - 8 floor, (x + 4) / 4). `audio`: float32 mono at 16 kHz."""
    audio = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    if audio.ndim != 1 or audio.numel() < N_FFT // 2 + 1:
        raise EMOInputError(
            f"audio must be mono with at least {N_FFT // 2 + 1} samples, got shape {tuple(audio.shape)}"
        )
    stft = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    magnitudes = stft[:, :-1].abs() ** 2
    log_spec = torch.clamp(_mel_filters() @ magnitudes, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@torch.no_grad()
def _encoder_states(encoder, mel: torch.Tensor) -> torch.Tensor:
    """`(80, 3000)` mel -> `(1500, blocks + 1, 384)`: the encoder's input to its first block and every block's
    output, without the final layer norm (whisper/model.py AudioEncoder `include_embeddings`)."""
    states: list[torch.Tensor] = []
    hooks = [encoder.layers[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]
    hooks += [
        layer.register_forward_hook(lambda m, a, out: states.append(out[0] if isinstance(out, tuple) else out))
        for layer in encoder.layers
    ]
    try:
        encoder(mel[None].to(encoder.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(states, dim=2)[0].float()


def _segments(num_mel: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, int]]:
    """EchoMimic's 30 s encoder segments (transcribe.py): `(seek, end_seek, feature steps kept)`."""
    for seek in range(0, num_mel, SEGMENT):
        end = min(seek + SEGMENT, num_mel)
        yield seek, end, int((end - seek) / 2)


def whisper_features(audio, encoder) -> torch.Tensor:
    """EchoMimic's `Audio2Feature.audio2feat`: `(N, blocks + 1, 384)` features at 50 Hz for the whole track.

    The mel (normalised over the whole track) is cut in 30 s segments, each zero-padded to 3000 mel frames (the
    mel is padded, not the audio), encoded, and the first `int(frames / 2)` steps of each kept. Memory: one segment
    at a time plus the features (whisper-tiny: 50 x 5 x 384 fp32 values, 384 KB per second of audio) and the
    track's mel (80 x 100 fp32 values, 32 KB per second).
    """
    mel = whisper_log_mel(audio)
    parts = []
    for seek, end, keep in _segments(mel.shape[-1]):
        segment = F.pad(mel[:, seek : seek + SEGMENT], (0, SEGMENT - (end - seek)))
        parts.append(_encoder_states(encoder, segment)[:keep])
    return torch.cat(parts)


def echomimic_frame_count(num_features: int, fps: float) -> int:
    """Frames EchoMimic makes for `num_features` whisper steps (audio2feature.py `feature2chunks`: it appends a
    frame, then stops once `int(i * (50 / fps))` exceeds the feature count, so the video runs ~2 frames past the
    audio)."""
    step, i = FEATURE_RATE / fps, 0
    while True:
        start = int(i * step)
        i += 1
        if start > num_features:
            return i


def whisper_frame_tokens(features: torch.Tensor, frames, fps: float) -> torch.Tensor:
    """`(N, L, 384)` features -> `(len(frames), 10 * L, 384)` tokens: frame i takes the 10 steps from
    `int(i * 50 / fps) - 4` to `+ 5`, clamped to the track (audio2feature.py `get_sliced_feature`)."""
    count = features.shape[0]
    index = []
    for i in frames:
        centre = int(i * FEATURE_RATE / fps)
        index.append(
            [min(count - 1, max(0, j)) for j in range(centre - 2 * WINDOW_BEFORE, centre + 2 * (WINDOW_AFTER + 1))]
        )
    index = torch.tensor(index, device=features.device)
    return features[index].flatten(1, 2)


# --------------------------------------------------------------------------------------- whisper checkpoint


def _whisper_key(key: str) -> str | None:
    """openai-whisper encoder key (without `encoder.`) -> transformers `WhisperEncoder` key."""
    parts = key.split(".")
    simple = {"conv1": "conv1", "conv2": "conv2", "ln_post": "layer_norm"}
    if parts[0] in simple:
        return ".".join([simple[parts[0]], *parts[1:]])
    if key == "positional_embedding":
        return "embed_positions.weight"
    if parts[0] == "blocks" and len(parts) >= 4:
        layer, rest = parts[1], ".".join(parts[2:])
        names = {
            "attn.query": "self_attn.q_proj",
            "attn.key": "self_attn.k_proj",
            "attn.value": "self_attn.v_proj",
            "attn.out": "self_attn.out_proj",
            "attn_ln": "self_attn_layer_norm",
            "mlp.0": "fc1",
            "mlp.2": "fc2",
            "mlp_ln": "final_layer_norm",
        }
        module, _, leaf = rest.rpartition(".")
        if module in names:
            return f"layers.{layer}.{names[module]}.{leaf}"
    return None


def convert_whisper_checkpoint(checkpoint: object, name: str = "whisper checkpoint"):
    """openai-whisper's `{"dims", "model_state_dict"}` (EchoMimic's `audio_processor/whisper_tiny.pt`) -> a
    transformers `WhisperModel`'s encoder with its weights. The text decoder's keys are accounted for and dropped
    (EchoMimic never runs it). A checkpoint whose encoder is not whisper-tiny's shape (80 mels, 1500 positions,
    width 384, 6 heads) is an `EMOInputError`: EchoMimic's feature width is 384."""
    from transformers import WhisperConfig

    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        kind = "a state dict" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise EMOInputError(
            f"{name} is not an openai-whisper checkpoint (a dict with 'dims' and 'model_state_dict'), it is {kind}; "
            "EchoMimic's audio_processor/whisper_tiny.pt is one"
        )
    dims, state = dict(checkpoint["dims"]), checkpoint["model_state_dict"]
    wrong = {k: dims.get(k) for k, v in WHISPER_TINY_DIMS.items() if dims.get(k) != v}
    if wrong:
        raise EMOInputError(
            f"{name} is not whisper-tiny: its dims {wrong} differ from whisper-tiny's {WHISPER_TINY_DIMS} "
            "(EchoMimic's audio layers take 384-wide whisper-tiny features)"
        )
    layers = int(dims["n_audio_layer"])
    config = WhisperConfig(
        num_mel_bins=80,
        d_model=384,
        encoder_layers=layers,
        encoder_attention_heads=6,
        encoder_ffn_dim=4 * 384,
        decoder_layers=1,
        decoder_attention_heads=6,
        decoder_ffn_dim=4 * 384,
        max_source_positions=1500,
    )
    encoder = WhisperAudioEncoder(config)
    converted, unplaced = {}, []
    for key, value in state.items():
        if key.startswith("decoder."):
            continue  # the text decoder: not used by EchoMimic
        target = _whisper_key(key.removeprefix("encoder.")) if key.startswith("encoder.") else None
        if target is None:
            unplaced.append(key)
        else:
            converted[target] = value.float()
    missing, unexpected = encoder.load_state_dict(converted, strict=False)
    if unplaced or missing or unexpected:
        raise EMOInputError(
            f"{name} does not fit a whisper encoder: {len(unplaced)} keys with no place (e.g. {unplaced[:3]}), "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return encoder.eval()


def load_whisper_encoder(path: str | os.PathLike):
    """`convert_whisper_checkpoint` of the file at `path` (`torch.load(weights_only=True)`)."""
    path = Path(path)
    if not path.is_file():
        raise EMOInputError(f"whisper checkpoint {path} does not exist (EchoMimic's audio_processor/whisper_tiny.pt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or not a torch file
        raise EMOInputError(f"whisper checkpoint {path} cannot be read ({type(error).__name__}: {error})") from error
    return convert_whisper_checkpoint(checkpoint, str(path))

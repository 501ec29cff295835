"""Golden of Hallo's wav2vec2 audio features, from Hallo's own ``Wav2VecModel`` under transformers 4.39.2.

Not run in CI. Hallo (fudan-generative-vision/hallo, MIT) is imported at run time from ``--hallo-src``; only
``hallo/models/wav2vec.py`` is needed (it imports torch and transformers only: no shim). It runs under Hallo's
own pin, transformers==4.39.2, in a separate venv::

    python3 -m venv /work/venv-hallo-tf439 && . /work/venv-hallo-tf439/bin/activate
    pip install torch==2.13.0 transformers==4.39.2 safetensors "numpy<2"
    python tests/goldens/make_wav2vec_golden.py --hallo-src /tmp/hallo-src --output tests/goldens/hallo/wav2vec

What it reproduces (docs/hallo_architecture.md, section 6; audio_processor.py:106-125, wav2vec.py):
a tiny random wav2vec2 (same structure as wav2vec2-base: group-norm CNN feature encoder with the base strides,
post-norm transformer; every parameter random) saved as a transformers folder (``model.safetensors``,
``config.json``, ``preprocessor_config.json``) so our side can load the same weights with transformers 5; a
deterministic 1.3 s waveform; ``Wav2Vec2FeatureExtractor`` normalisation; the zero padding to a whole number of
clips AFTER normalisation; ``Wav2VecModel(input, seq_len=...)`` with its linear interpolation of the CNN features
to ``seq_len`` video frames BEFORE the feature projection; and the stacked hidden states of every transformer
layer (``hidden_states[1:]``) as Hallo's AudioProcessor returns them, ``(seq_len, layers, hidden)``.

It also saves the plain ``Wav2Vec2Model`` forward (no interpolation) of the same weights on the same input, so a
transformers 5 load of the folder can be checked against transformers 4.39 independently of the interpolation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000  # default.yaml data.driving_audio.sample_rate
FPS = 25  # default.yaml data.export_video.fps
CLIP_LENGTH = 16  # default.yaml data.n_sample_frames
SECONDS = 1.3  # 32.5 frames -> 33 -> padded to 48 (3 clips): exercises the padding
SEED = 1234

TINY_WAV2VEC2 = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16, 16, 16, 16, 16, 16, 16],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],  # wav2vec2-base: 320 samples per CNN frame
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False,
    "feat_extract_norm": "group",  # wav2vec2-base
    "do_stable_layer_norm": False,  # post-norm transformer, like wav2vec2-base
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "vocab_size": 32,
}
FEATURE_EXTRACTOR = {  # wav2vec2-base-960h's preprocessor_config.json
    "feature_size": 1,
    "sampling_rate": SAMPLE_RATE,
    "padding_value": 0.0,
    "do_normalize": True,
    "return_attention_mask": False,
}


def waveform() -> np.ndarray:
    """A deterministic speech-like test signal: a gliding harmonic tone, amplitude-modulated, plus seeded noise."""
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 60 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2)
    noise = np.random.default_rng(SEED).normal(0, 0.05, size=t.shape)
    return (0.3 * voice + noise).astype(np.float32)


def randomise_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random: weights N(0, 1/fan_in), norm scales 1 + 0.1 N, biases and the rest 0.1 N."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hallo-src", type=Path, required=True, help="a checkout of fudan-generative-vision/hallo")
    parser.add_argument("--output", type=Path, default=Path("tests/goldens/hallo/wav2vec"))
    args = parser.parse_args()
    sys.path.insert(0, str(args.hallo_src.resolve()))

    import transformers
    from einops import rearrange
    from hallo.models.wav2vec import Wav2VecModel
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    model_dir = args.output / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    model = Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC2))
    randomise_(model, torch.Generator().manual_seed(SEED))
    model.save_pretrained(model_dir, safe_serialization=True)
    Wav2Vec2FeatureExtractor(**FEATURE_EXTRACTOR).save_pretrained(model_dir)

    # audio_processor.py:52-53: loading as Hallo does
    audio_encoder = Wav2VecModel.from_pretrained(model_dir, local_files_only=True)
    audio_encoder.feature_extractor._freeze_parameters()
    assert not audio_encoder.training
    wav2vec_feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(model_dir, local_files_only=True)

    # audio_processor.py:106-125 (the vocal separator and librosa resampling are skipped: the signal is 16 kHz)
    speech_array = waveform()
    audio_feature = np.squeeze(wav2vec_feature_extractor(speech_array, sampling_rate=SAMPLE_RATE).input_values)
    seq_len = math.ceil(len(audio_feature) / SAMPLE_RATE * FPS)
    audio_length = seq_len
    audio_feature = torch.from_numpy(audio_feature).float()
    clip_length = CLIP_LENGTH
    if clip_length > 0 and seq_len % clip_length != 0:
        audio_feature = torch.nn.functional.pad(
            audio_feature, (0, (clip_length - seq_len % clip_length) * (SAMPLE_RATE // FPS)), "constant", 0.0
        )
        seq_len += clip_length - seq_len % clip_length
    audio_feature = audio_feature.unsqueeze(0)
    with torch.no_grad():
        embeddings = audio_encoder(audio_feature, seq_len=seq_len, output_hidden_states=True)
        audio_emb = torch.stack(embeddings.hidden_states[1:], dim=1).squeeze(0)
        audio_emb = rearrange(audio_emb, "b s d -> s b d")
        cnn_features = audio_encoder.feature_extractor(audio_feature).transpose(1, 2)  # (1, T_cnn, conv_dim)
        interpolated = audio_encoder.feature_extract(audio_feature, seq_len)  # (1, seq_len, conv_dim)
        plain = Wav2Vec2Model.from_pretrained(model_dir, local_files_only=True).eval()
        plain_out = plain(audio_feature, output_hidden_states=True)

    tensors = {
        "waveform": torch.from_numpy(speech_array),  # (N,) float32, 16 kHz, before the feature extractor
        "input_values": audio_feature,  # (1, N_padded) normalised, zero-padded to whole clips
        "cnn_features": cnn_features,  # (1, T_cnn, conv_dim) feature-encoder output, before interpolation
        "interpolated_features": interpolated,  # (1, seq_len, conv_dim) after linear_interpolation
        "last_hidden_state": embeddings.last_hidden_state,  # (1, seq_len, hidden)
        "hidden_states": torch.stack(embeddings.hidden_states, dim=1).squeeze(0),  # (layers + 1, seq_len, hidden)
        "audio_emb": audio_emb.contiguous(),  # (seq_len, layers, hidden): AudioProcessor.preprocess's output
        "plain_last_hidden_state": plain_out.last_hidden_state,  # (1, T_cnn, hidden): Wav2Vec2Model.forward
        "plain_hidden_states": torch.stack(plain_out.hidden_states, dim=1).squeeze(0),  # (layers + 1, T_cnn, hidden)
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.output / "wav2vec_golden.safetensors")
    metadata = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sample_rate": SAMPLE_RATE,
        "fps": FPS,
        "clip_length": CLIP_LENGTH,
        "num_samples": len(speech_array),
        "seq_len": seq_len,
        "audio_length": audio_length,
        "num_cnn_frames": cnn_features.shape[1],
        "wav2vec2_config": TINY_WAV2VEC2,
        "feature_extractor": FEATURE_EXTRACTOR,
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
    }
    (args.output / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    print(json.dumps(metadata["shapes"]))


if __name__ == "__main__":
    main()

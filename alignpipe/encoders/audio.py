"""Audio encoders: the Whisper encoder, AST and CLAP's audio tower.

Decode threads read the file (soundfile), resample to the model's rate (soxr), take the
deterministic centre window of a long clip and run the model's own feature extractor; the
device runs the transformer. Whisper pads every clip to 30 s, so its latent is the mean over the
encoder frames that cover real audio, not the padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from alignpipe.data.media import MediaRef, centre_crop, load_audio
from alignpipe.encoders.base import check_pooling, freeze, masked_mean
from alignpipe.encoders.hf import load_hf_model, processor_source
from alignpipe.encoders.registry import EncoderError, EncoderSpec, get_adapter, register_adapter
from alignpipe.encoders.weights import WeightsSource

if TYPE_CHECKING:
    from transformers import PretrainedConfig, SequenceFeatureExtractor


def _feature_extractor(spec: EncoderSpec, source: WeightsSource,
                       cls: type[SequenceFeatureExtractor] | None = None,
                       ) -> SequenceFeatureExtractor:
    from transformers import AutoFeatureExtractor, WhisperFeatureExtractor

    if spec.test_config is not None and "feature_extractor" in spec.test_config:
        return WhisperFeatureExtractor(**spec.test_config["feature_extractor"])
    where = processor_source(spec, source, "preprocessor_config.json")
    try:
        return (cls or AutoFeatureExtractor).from_pretrained(where)
    except (OSError, ValueError) as err:
        raise EncoderError(f"{spec.name}: cannot load the feature extractor from {where}: "
                           f"{err}") from None


class _AudioAdapter:
    """Shared decode step: file -> mono float32 at the extractor's rate, centre-cropped."""

    modality = "audio"
    sort_key = None

    def _setup(self, spec: EncoderSpec, source: WeightsSource, device: torch.device,
               extractor: SequenceFeatureExtractor, max_seconds: float | None) -> None:
        self.spec, self.source, self.device = spec, source, device
        self.extractor = extractor
        self.sample_rate = int(extractor.sampling_rate)
        self.max_seconds = max_seconds
        self.max_samples = int(round(max_seconds * self.sample_rate)) if max_seconds else None

    def wave(self, value: MediaRef) -> np.ndarray:
        return centre_crop(load_audio(value, self.sample_rate), self.max_samples)

    def prepare(self, value: MediaRef) -> np.ndarray | tuple[np.ndarray, int]:
        return self.prepare_wave(self.wave(value))

    def prepare_wave(self, wave: np.ndarray) -> np.ndarray | tuple[np.ndarray, int]:
        """Mono float32 at `sample_rate`, already centre-cropped -> what `collate` stacks."""
        raise NotImplementedError

    def collate(self, items: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {"features": torch.from_numpy(np.stack(items))}

    def describe(self) -> dict:
        keep = ("feature_extractor_type", "sampling_rate", "feature_size", "hop_length",
                "n_fft", "chunk_length", "max_length", "num_mel_bins", "mean", "std",
                "truncation", "padding", "max_length_s")
        features = {k: v for k, v in self.extractor.to_dict().items() if k in keep}
        return {"backend": self.spec.backend, "model_id": self.spec.model_id,
                "revision": getattr(self.model.config, "_commit_hash", None),
                "pooling": self.pooling, "sample_rate": self.sample_rate,
                "max_seconds": self.max_seconds, "crop": "centre",
                "preprocessing": {"library": "transformers feature extractor", **features},
                **self.source.record()}


@register_adapter("hf-whisper", modality="audio", poolings=("mean",), model_types=("whisper",))
class WhisperAudioEncoder(_AudioAdapter):
    """The Whisper encoder, mean over the frames of real audio."""

    def __init__(self, spec: EncoderSpec, source: WeightsSource, *, pooling: str | None,
                 device: torch.device, config: PretrainedConfig | None = None) -> None:
        from transformers import WhisperModel

        extractor = _feature_extractor(spec, source)
        self._setup(spec, source, device, extractor, float(extractor.chunk_length))
        self.pooling = check_pooling(spec, pooling, get_adapter(spec.backend).poolings)
        model = load_hf_model(WhisperModel, spec, source)
        self.model = freeze(model.get_encoder(), device)  # the decoder is never used
        self.dim = int(self.model.config.d_model)
        del model

    def prepare_wave(self, wave: np.ndarray) -> tuple[np.ndarray, int]:
        feats = self.extractor(wave, sampling_rate=self.sample_rate,
                               return_attention_mask=True, return_tensors="np")
        return feats["input_features"][0], int(feats["attention_mask"][0].sum())

    def collate(self, items: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        return {"features": torch.from_numpy(np.stack([f for f, _ in items])),
                "frames": torch.tensor([n for _, n in items], dtype=torch.long)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(batch["features"]).last_hidden_state
        # The encoder's stride-2 conv halves the mel frames: output frame j covers 2j, 2j+1.
        real = ((batch["frames"] + 1) // 2).clamp(min=1, max=hidden.shape[1])
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < real[:, None]
        return masked_mean(hidden, mask)


@register_adapter("hf-ast", modality="audio", poolings=("cls+dist", "mean"),
                  model_types=("audio-spectrogram-transformer",))
class ASTAudioEncoder(_AudioAdapter):
    """The Audio Spectrogram Transformer: its CLS+distill pooling, or a token mean."""

    def __init__(self, spec: EncoderSpec, source: WeightsSource, *, pooling: str | None,
                 device: torch.device, config: PretrainedConfig | None = None) -> None:
        from transformers import ASTModel

        extractor = _feature_extractor(spec, source)
        frames = int(extractor.max_length)  # 10 ms hop: frames -> seconds
        self._setup(spec, source, device, extractor, spec.max_seconds or frames / 100)
        self.pooling = check_pooling(spec, pooling, get_adapter(spec.backend).poolings)
        self.model = freeze(load_hf_model(ASTModel, spec, source), device)
        self.dim = int(self.model.config.hidden_size)

    def prepare_wave(self, wave: np.ndarray) -> np.ndarray:
        feats = self.extractor(wave, sampling_rate=self.sample_rate, return_tensors="np")
        return feats["input_values"][0]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(input_values=batch["features"])
        if self.pooling == "cls+dist":
            return out.pooler_output  # AST's own pooling: mean of the CLS and distill tokens
        return out.last_hidden_state[:, 2:].mean(1)


@register_adapter("hf-clap", modality="audio", poolings=("projection",), model_types=("clap",))
class ClapAudioEncoder(_AudioAdapter):
    """CLAP's audio tower, projected."""

    def __init__(self, spec: EncoderSpec, source: WeightsSource, *, pooling: str | None,
                 device: torch.device, config: PretrainedConfig | None = None) -> None:
        from transformers import ClapAudioModelWithProjection, ClapFeatureExtractor

        extractor = _feature_extractor(spec, source, ClapFeatureExtractor)
        self._setup(spec, source, device, extractor,
                    spec.max_seconds or float(extractor.max_length_s))
        self.pooling = check_pooling(spec, pooling, get_adapter(spec.backend).poolings)
        self.model = freeze(load_hf_model(ClapAudioModelWithProjection, spec, source), device)
        self.dim = int(self.model.config.projection_dim)
        self.fusion = bool(getattr(self.model.config, "enable_fusion", False))

    def prepare_wave(self, wave: np.ndarray) -> np.ndarray:
        # Clips are already cut to the window, so the extractor's random truncation never runs.
        feats = self.extractor(wave, sampling_rate=self.sample_rate,
                               return_tensors="np")
        return feats["input_features"][0]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = batch["features"]
        longer = torch.zeros(features.shape[0], 1, dtype=torch.bool, device=features.device)
        extra = {"is_longer": longer} if self.fusion else {}
        return self.model(input_features=features, **extra).audio_embeds

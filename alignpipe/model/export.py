"""`export_model`: a run folder -> a self-contained model folder, optionally pushed to the hub.

The folder holds ``alignpipe-model.json`` (both sides' encoder specs with their weights
provenance, the method and its config, the training data and the run's eval numbers, the heads
file's sha256), ``heads.safetensors`` and a model card ``README.md``. `load_model(OUT)` needs
nothing else: no cache, manifest or run folder.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from alignpipe._version import __version__
from alignpipe.model.aligned import ModelError
from alignpipe.model.load import (
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_HEADS,
    EXPORT_VERSION,
    export_tensors,
    load_model,
)
from alignpipe.util.fsutil import atomic_write_bytes

# Provenance keys that describe the machine the store was made on, not the encoder.
_LOCAL_KEYS = ("weights_path",)


def _portable(attrs: dict) -> dict:
    """An encoder record without this machine's paths (the sha256 says which weights)."""
    out = {k: v for k, v in attrs.items() if k not in _LOCAL_KEYS}
    if attrs.get("weights_path"):
        out["weights_file"] = Path(str(attrs["weights_path"])).name
    return out


_METRIC_KEYS = ("top1", "top5", "mean_per_class_top1", "mean_recall")


def _eval_results(run: Path) -> list[dict]:
    """The headline numbers of every eval result of this run in its folder (or its pipeline's
    ``evals/`` folder beside it)."""
    found = []
    for path in sorted([*run.glob("eval-*.json"), *(run.parent / "evals").glob("*.json")]):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("run_name") != run.name:
            continue
        produced = data.get("produced_by") if isinstance(data.get("produced_by"), dict) else {}
        metrics = {k: float(data[k]) for k in _METRIC_KEYS if isinstance(data.get(k), (int, float))}
        for key, value in data.items():
            if isinstance(value, dict) and any(str(k).startswith("R@") for k in value):
                metrics.update({f"{key}.{k}": float(v) for k, v in value.items()
                                if isinstance(v, (int, float))})
        if metrics:
            found.append({"kind": produced.get("kind", path.stem), "split": data.get("split"),
                          "file": path.name, "metrics": metrics})
    return found


def _card(config: dict) -> str:
    sides, training = config["sides"], config["training"]
    lines = [f"# {config['name']}", "",
             f"An aligned {' + '.join(s['modality'] for s in sides.values())} model made with "
             f"[alignpipe](https://pypi.org/project/alignpipe/) {config['alignpipe_version']}: "
             f"two frozen encoders and `{config['method']}` heads that map both into one "
             f"shared space.", "", "## Encoders", "",
             "| side | modality | encoder | model | pooling | dim | weights |",
             "|---|---|---|---|---|---|---|"]
    for side, rec in sides.items():
        enc = rec["encoder"]
        sha = enc.get("weights_sha256")
        weights = f"{enc.get('weights')}" + (f", sha256 `{sha[:16]}…`" if sha else "")
        lines.append(f"| {side} | {rec['modality']} | `{enc.get('name')}` | "
                     f"{enc.get('model_id')} | {enc.get('pooling')} | {rec['dim']} | "
                     f"{weights} |")
    lines += ["", "## Method", "", f"`{config['method']}`; config:", "", "```json",
              json.dumps(config["config"], indent=1, sort_keys=True), "```", "",
              "## Training data", "",
              f"{training.get('train_pairs', '?')} training pairs and "
              f"{training.get('val_pairs', '?')} validation pairs from the manifest with "
              f"sha256 `{str(training.get('manifest_sha256'))[:16]}…` "
              f"({training.get('manifest_rows', '?')} rows); best epoch "
              f"{training.get('best_epoch', '-')}.", "", "## Evaluation", ""]
    if config["evals"]:
        lines += ["| eval | split | metric | value |", "|---|---|---|---|"]
        for result in config["evals"]:
            for key, value in result["metrics"].items():
                lines.append(f"| {result['kind']} | {result['split']} | {key} | {value:.2f} |")
    else:
        lines.append("No eval results were in the run folder when it was exported.")
    lines += ["", "## Use", "", "```python", "import alignpipe", "",
              "model = alignpipe.load_model(\"PATH/TO/THIS/FOLDER\")"]
    modalities = [s["modality"] for s in sides.values()]
    other = next((m for m in modalities if m != "text"), modalities[0])
    if "text" in modalities:
        lines += ["model.zero_shot([\"cat\", \"dog\"], \"photo\")",
                  f"model.classify([\"example.{'wav' if other == 'audio' else 'jpg'}\"], k=2)",
                  "text = model.encode(\"text\", [\"a photo of a cat\"])"]
    lines += ["```", "", "or `alignpipe predict THIS_FOLDER FILES... --classes NAMES`. The "
              "encoders' weights load as their store recorded (the hub, an installed package, "
              "or `weights={\"image\": PATH}` / `--weights image=PATH`); their sha256 is "
              "checked.", ""]
    return "\n".join(lines)


def export_model(run: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model of the finished run `run` into the folder `out`."""
    from alignpipe.data.manifest import file_sha256
    from alignpipe.fit.runfolder import FitSummary, read_identity, save_tensors

    run, out = Path(run), Path(out)
    model = load_model(run)
    identity = read_identity(run)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ModelError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not (out / EXPORT_CONFIG).exists():
            raise ModelError(f"{out} is not an exported model; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / EXPORT_HEADS, export_tensors(model))
    summary = FitSummary.read(run)
    stores = identity["stores"]
    config = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "name": run.name,
        "alignpipe_version": __version__,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": identity["method"], "config": identity["config"],
        "heads": {"file": EXPORT_HEADS, "sha256": file_sha256(out / EXPORT_HEADS)},
        "sides": {s: {"modality": side.modality, "dim": int(stores[s]["dim"]),
                      "latent_dtype": side.latent_dtype,
                      "encoder": _portable(side.encoder_attrs)}
                  for s, side in model.sides.items()},
        "training": {"train_pairs": summary.train_pairs, "val_pairs": summary.val_pairs,
                     "best_epoch": summary.best_epoch, "epochs": summary.epochs,
                     "manifest_sha256": stores["a"].get("manifest_sha256"),
                     "manifest_rows": stores["a"].get("rows")},
        "evals": _eval_results(run),
    }
    atomic_write_bytes(out / EXPORT_CONFIG, json.dumps(config, indent=1).encode())
    atomic_write_bytes(out / "README.md", _card(config).encode())
    return out


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False,
                token: str | None = None) -> str:
    """Upload an exported folder to the Hugging Face hub as a model repo; its URL."""
    from alignpipe.encoders.hub import hub_problem

    folder = Path(folder)
    if not (folder / EXPORT_CONFIG).exists():
        raise ModelError(f"{folder}: not an exported model (no {EXPORT_CONFIG})")
    problem = hub_problem()
    if problem:
        raise ModelError(f"cannot push to the hub: {problem}; the export in {folder} is "
                         f"complete, upload it later with `alignpipe export ... "
                         f"--push-to-hub {repo_id}`")
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="alignpipe export")
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise ModelError(f"cannot push {folder} to {repo_id}: "
                         f"{' '.join(str(err).split())[:300]}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")

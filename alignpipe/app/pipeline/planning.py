"""What a pipeline needs before it starts: making manifests, and checking inputs exist.

`alignpipe run` calls these before any work so that a missing dataset or weights file is one
message naming every missing input, not a traceback half-way through.
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignpipe.util.errors import AlignpipeError

if TYPE_CHECKING:
    from alignpipe.data.builders.registry import BuilderSpec, Option


def did_you_mean(word: str, options: Iterable[object]) -> str:
    """``; did you mean x?`` when `word` is a likely typo of one of `options`."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _spec(make: dict) -> BuilderSpec:
    """The registered builder a make: block names, or an AlignpipeError naming the known ones."""
    from alignpipe.data.builders import builder_spec, list_builders

    kind = make.get("kind")
    known = list_builders()
    if not isinstance(kind, str) or kind not in known:
        raise AlignpipeError(f"unknown make kind {kind!r}" + did_you_mean(str(kind), known)
                             + f"; use one of {', '.join(known)}")
    return builder_spec(kind)


def _coerce(kind: str, option: Option, key: str, value: Any) -> Any:
    """A make: value as the option's type: YAML (or --set, which gives text) to int/float/bool."""
    wanted = option.type
    if value is None or wanted in (str, Path):
        if isinstance(value, (dict, list)):
            raise AlignpipeError(f"make {kind}: {key} must be a single value, got {value!r}")
        return value
    if wanted is bool:
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in ("true", "false", "yes", "no", "1", "0"):
            return value if isinstance(value, bool) else text in ("true", "yes", "1")
    elif wanted in (int, float) and not isinstance(value, bool):
        try:
            number = wanted(value)
            if wanted is float or float(value) == number:
                return number
        except (TypeError, ValueError):
            pass
    raise AlignpipeError(f"make {kind}: {key} must be {wanted.__name__}, got {value!r}")


def make_option_problems(make: object) -> list[str]:
    """What a ``make:`` block gets wrong before anything runs: an unknown kind, or options its
    builder does not declare (named, with close matches)."""
    if not isinstance(make, dict):
        return ["make must be a mapping with a 'kind'"]
    try:
        spec = _spec(make)
    except AlignpipeError as err:
        return [str(err)]
    keys = spec.make_options()
    unknown = sorted(set(map(str, make)) - set(keys) - {"kind"})
    if not unknown:
        return []
    takes = sorted({o.name for o in keys.values()})
    return [f"make {spec.kind}: unknown option(s) {', '.join(unknown)}"
            + did_you_mean(unknown[0], takes) + f"; it takes {', '.join(takes)}"]


def _make_values(make: dict, manifest: Path) -> tuple[BuilderSpec, dict[str, Any]]:
    """(spec, keyword values) of a make: block: keys checked, aliases resolved, types coerced."""
    problems = make_option_problems(make)
    if problems:
        raise AlignpipeError(problems[0])
    spec = _spec(make)
    keys = spec.make_options()
    values = {}
    for key, value in make.items():
        if key == "kind":
            continue
        option = keys[key]
        if option.name in values:
            raise AlignpipeError(f"make {spec.kind}: {key} and {option.name} are the same option; "
                                 f"give one")
        values[option.name] = _coerce(spec.kind, option, key, value)
    if spec.writes_folder:
        values.setdefault("out", manifest.parent)
    else:
        values["out"] = manifest
    return spec, values


def make_source_problems(make: dict) -> list[str]:
    """Paths a ``make:`` block names that do not exist (empty when it can run)."""
    try:
        spec = _spec(make)
    except AlignpipeError as err:
        return [str(err)]
    keys = spec.make_options()
    given = {keys[k].name: v for k, v in make.items() if k in keys}
    problems = []
    hint = spec.where_to_get
    if spec.source:
        source = given.get(spec.source)
        if not source:
            problems.append(f"make {spec.kind} needs '{spec.source}'"
                            + (f" ({hint})" if hint else ""))
        elif "{" not in str(source) and not Path(source).exists():
            problems.append(f"{source} does not exist" + (f": {hint}" if hint else ""))
    for option in spec.options:
        value = given.get(option.name)
        if option.exists and option.name != spec.source and value and not Path(value).exists():
            problems.append(f"{option.name} {value} does not exist")
    return problems


def make_manifest(step: dict) -> Path:
    """Build the manifest a data step names (``make: {kind: ..., ...}``) at its path."""
    out = Path(step["manifest"])
    spec, values = _make_values(dict(step["make"]), out)
    spec.run(values)
    if spec.writes_folder and not out.exists():
        raise AlignpipeError(f"make {spec.kind} wrote into {values['out']} but {out} is not among "
                             f"its files")
    return out


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the model hub answers at all (it never does on an air-gapped machine)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_cached_reason(encoder: str) -> str | None:
    """Why `encoder`'s weights would have to come from the hub (None when they need not)."""
    from huggingface_hub import try_to_load_from_cache

    from alignpipe.encoders import get_encoder_spec, resolve_weights

    spec = get_encoder_spec(encoder)
    if resolve_weights(spec, None).kind != "hub":
        return None  # test encoders, installed copies (register_installed_copy)
    repo = f"timm/{spec.model_id}" if spec.backend == "timm" else spec.model_id
    if "/" in repo and isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return None
    return f"the weights of {spec.model_id} are not in the local hub cache"


def weights_problems(step: dict) -> list[str]:
    """Why an embed step could not load its encoder's weights here (empty when it can)."""
    weights = step.get("weights")
    if weights:
        return [] if Path(weights).exists() or weights == "random" else [
            f"weights {weights} do not exist"]
    reason = _not_cached_reason(str(step["encoder"]))
    if reason is None or _hub_reachable():
        return []
    return [f"{step['encoder']}: {reason} and the hub is unreachable from here: download them "
            f"once where it is reachable, or point `weights:` (--set "
            f"embed.<id>.weights=PATH) at a local copy"]

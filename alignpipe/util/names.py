"""Names a user gives that become one folder: a pipeline, a dataset, a run, a step."""

from __future__ import annotations

from alignpipe.util.errors import AlignpipeError

_SEPARATORS = ("/", "\\", "\0")


def plain_name_problem(value: object, what: str) -> str | None:
    """Why `value` cannot be one path component inside a cache or runs folder (None if it can).

    ``../../x``, ``a/b``, ``.``, ``..``, an empty name or a non-string would write outside the
    folder (or into its parent), so they are refused rather than normalised.
    """
    if not isinstance(value, str) or value.strip() == "":
        return f"{what} must be a non-empty name, got {value!r}"
    if value in (".", "..") or any(sep in value for sep in _SEPARATORS):
        return (f"{what} {value!r} must be a plain name (one folder: no '/', '\\' or '..'), "
                f"so that it stays inside its cache or runs folder")
    return None


def plain_name(value: object, what: str) -> str:
    """`value` when it is a plain single path component; an `AlignpipeError` otherwise."""
    problem = plain_name_problem(value, what)
    if problem:
        raise AlignpipeError(problem)
    return value

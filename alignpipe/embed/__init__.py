"""Stage one: stream a manifest once through a frozen encoder into its latent store.

>>> from alignpipe.embed import embed
>>> summary = embed("data_manifests/toy/toy.parquet", "test-vit", cache="cache")
>>> summary.line()

Modules: `api` (embed, embed_status, identity checks), `runner` (store creation, the job that
processes run), `engine` (one process: decoding, batches, device, writer), `plan` (a unit's
items), `decoders` (a unit's batches from either pool), `decode_processes` (forked decode
workers with per-item deadlines), `decode_threads` (decode threads with deadlines), `cluster`
(work units as dask tasks).
"""

from alignpipe.embed.api import (
    EmbedError,
    EmbedSummary,
    FailureRateError,
    embed,
    embed_status,
)

__all__ = ["EmbedError", "EmbedSummary", "FailureRateError", "embed", "embed_status"]

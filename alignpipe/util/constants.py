"""Names shared across layers, defined once here; this module imports nothing from alignpipe.

Each is re-exported where it is most at home (`manifest.SPLITS`, `store.LATENT_DTYPES`, ...);
those are the same objects, not copies.
"""

from __future__ import annotations

# What a manifest column or a store can hold (a store holds the latents of one of them).
MODALITIES = ("image", "text", "audio")
# Manifest columns whose cells are media file paths (``text`` holds the text itself).
FILE_COLUMNS = ("image", "audio")
# The values of a manifest's ``split`` column.
SPLITS = ("train", "val", "test")
# A media cell for a member of a tar archive: ``ARCHIVE.tar::MEMBER``.
ARCHIVE_SEPARATOR = "::"
# The dtypes a latent store keeps its vectors in (the encoder's compute dtype is separate:
# `alignpipe.encoders.base.COMPUTE_DTYPES`).
LATENT_DTYPES = ("float16", "float32")

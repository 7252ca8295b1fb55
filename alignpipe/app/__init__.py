"""The app on top of the core: the CLI, the pipeline runner, reports and plots, benchmarks and
the toy and synthetic data generators. It uses only the core's public modules; nothing in the
core imports it."""

from alignpipe.app import curation_data as _curation_data  # noqa: F401  (the toy-pool builder)
from alignpipe.app import toy as _toy  # noqa: F401  (registers the toy manifest builder)

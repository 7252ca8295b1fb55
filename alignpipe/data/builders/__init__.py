"""Manifest builders for public dataset layouts, plus the shipped class names and templates.

Every builder reads a dataset as it is downloaded, refuses a malformed layout with a
ManifestError that names the file and line or entry, checks that media exist (``check``:
``"error"`` refuses and lists the missing files, ``"skip"`` leaves those rows out and reports how
many, ``"off"`` trusts the paths), writes rows in a deterministic order, and returns a
BuildResult. Each builder registers itself with its options (``registry.py`` here); the
`alignpipe manifest` commands and a pipeline's ``make:`` blocks are made from those declarations.
Media cells are relative to the manifest's folder when the file lies inside it,
absolute otherwise.
"""

from alignpipe.data.builders._common import (
    CHECK_POLICIES,
    BuildResult,
    CheckPolicy,
    SplitPlan,
    check_policy,
)
from alignpipe.data.builders.audio import build_audiocaps, build_clotho
from alignpipe.data.builders.classes import (
    TEMPLATE_SETS,
    build_prompts,
    imagenet_class_names,
    imagenet_classes,
    imagenet_wnids,
    read_class_names,
    read_templates,
    templates,
)
from alignpipe.data.builders.folder import build_folder
from alignpipe.data.builders.imagenet import build_imagenet, devkit_id_to_wnid
from alignpipe.data.builders.karpathy import build_karpathy
from alignpipe.data.builders.registry import (
    BUILDERS,
    BuilderSpec,
    Option,
    builder_spec,
    list_builders,
    register_builder,
)
from alignpipe.data.builders.split import build_split
from alignpipe.data.builders.web import (
    build_caption_table,
    build_cc3m,
    build_img2dataset,
    build_webdataset,
    expand_braces,
)

__all__ = [
    "BUILDERS", "CHECK_POLICIES", "TEMPLATE_SETS", "BuildResult", "BuilderSpec", "CheckPolicy",
    "Option", "SplitPlan", "builder_spec", "list_builders", "register_builder",
    "build_audiocaps", "build_caption_table", "build_cc3m", "build_clotho", "build_folder",
    "build_imagenet", "build_img2dataset", "build_karpathy", "build_prompts", "build_split",
    "build_webdataset", "check_policy",
    "devkit_id_to_wnid", "expand_braces", "imagenet_class_names", "imagenet_classes",
    "imagenet_wnids", "read_class_names", "read_templates", "templates",
]

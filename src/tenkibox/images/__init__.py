"""Guest images: building (mmdebstrap), finding and listing them. See ``builder``."""

from .builder import (
    BOOT_CMDLINE,
    ImageBuildError,
    ImagePaths,
    build_image,
    ensure_image,
    get_image,
    image_paths,
    list_images,
)

__all__ = [
    "BOOT_CMDLINE",
    "ImageBuildError",
    "ImagePaths",
    "build_image",
    "ensure_image",
    "get_image",
    "image_paths",
    "list_images",
]

"""The container image every component and Ray pod runs, tagged with the package version.

One constant, derived from ``keel.__version__``, keeps compiled pipeline YAML
deterministic and ties each release of the YAML to the image built with it. A
platform team that builds the image into its own registry (`make image
IMAGE=registry.example.com/keel-runtime`) points a compiled pipeline's steps at
it with :func:`use_runtime_image` (`keel submit --image`, `KEEL_IMAGE`).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

from keel import __version__
from keel.errors import ConfigError

IMAGE_REPOSITORY = "ghcr.io/keel-mlops/keel-runtime"
RUNTIME_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
# [registry[:port]/]path[:tag][@sha256:digest], lower-case path components as the OCI distribution spec has them
IMAGE_REFERENCE = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:[._/-][a-z0-9]+)*"
                             r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")


def check_image(image: str) -> str:
    """``image`` when it is an image reference a kubelet can pull; a ConfigError naming it otherwise."""
    if not IMAGE_REFERENCE.match(image) or not (":" in image.rsplit("/", 1)[-1] or "@" in image):
        raise ConfigError(f"--image {image!r}: expected REGISTRY/PATH:TAG or REGISTRY/PATH@sha256:DIGEST, e.g. "
                          f"registry.example.com/keel-runtime:{__version__} (a tag, so that every step of a run "
                          "gets the same image).")
    return image


def chosen_image(flag: str, configured: str) -> str:
    """The image steps run: ``--image``, else ``KEEL_IMAGE`` (``configured``), checked before anything is compiled
    or uploaded; empty for Keel's own."""
    image = flag or configured
    return check_image(image) if image else ""


def image_fingerprint(image: str) -> str:
    """A short stand-in for a non-default image in a pipeline version's name: two builds of one commit for
    two registries are two versions, so a resubmission never reuses one that pulls the other image."""
    return "" if image in ("", RUNTIME_IMAGE) else hashlib.sha256(image.encode()).hexdigest()[:8]


def use_runtime_image(package: Path, image: str) -> Path:
    """Point every step of a compiled pipeline (KFP IR YAML) that runs Keel's image at ``image`` instead;
    other images (none today) are left alone. Returns ``package``, rewritten in place."""
    import yaml

    if image in ("", RUNTIME_IMAGE):
        return package
    text = package.read_text()
    header = "".join(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines(keepends=True)))
    documents = list(yaml.safe_load_all(text))
    for executor in documents[0].get("deploymentSpec", {}).get("executors", {}).values():
        container = executor.get("container", {})
        if container.get("image") == RUNTIME_IMAGE:
            container["image"] = check_image(image)
    package.write_text(header + yaml.safe_dump_all(documents, sort_keys=False))
    return package

"""The container image every component and Ray pod runs, tagged with the package version.

One constant, derived from ``keel.__version__``, keeps compiled pipeline YAML
deterministic and ties each release of the YAML to the image built with it.
"""

from keel import __version__

IMAGE_REPOSITORY = "ghcr.io/keel-mlops/keel-runtime"
RUNTIME_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"

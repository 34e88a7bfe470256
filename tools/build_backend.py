"""The package's build backend: setuptools' own, with one informational note silenced.

The repository root is the package `ruyi_trt` (so it can be cloned into ComfyUI's custom_nodes/), so an
editable install always uses setuptools' import-hook finder, and setuptools then prints an "Editable
installation" note on every `pip install -e .`. It is information, not a problem; everything else
setuptools reports still shows.
"""

import warnings

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - the PEP 517 hooks, unchanged
from setuptools.warnings import InformationOnly

__all__ = _setuptools.__all__


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)

"""Sphinx configuration for the errand-boy documentation.

Build it with ``sphinx-build -W -b html docs docs/_build/html`` (the ``docs``
extra installs Sphinx). The build needs no network: no intersphinx, no
remote images or themes.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the errand_boy package, uninstalled
sys.path.insert(0, os.path.join(HERE, "_ext"))

from errand_boy import __version__  # noqa: E402

project = "errand-boy"
author = "the errand-boy developers"
copyright = "the errand-boy developers; BSD 3-Clause"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "cliref",  # docs/_ext/cliref.py: the command-line reference, from the parser
]

root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
# The standard library's names are written as text, not resolved: no intersphinx (no network).
html_theme = "alabaster"
html_static_path: list = []
html_title = f"errand-boy {release}"

"""Where the bundled recipe YAML lives.

The repository keeps the data in the top-level ``recipes/`` folder; an installed distribution ships the same files
as package data of the namespace ``hf_optim.recipes`` (setuptools maps that package to ``recipes/``), so they are
found from any working directory. A source checkout that is on ``sys.path`` without being installed has no such
package: then the folder next to ``hf_optim/`` is used.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path


@cache
def recipes_dir() -> Path:
    """The folder holding ``llm/``, ``demo/``, ``sweeps/`` and ``accelerate/``."""
    try:
        spec = importlib.util.find_spec("hf_optim.recipes")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "llm").is_dir():
                return Path(location)
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    if (checkout / "llm").is_dir():
        return checkout
    raise FileNotFoundError(
        "The bundled recipes were not found: neither the package data hf_optim.recipes nor a recipes/ folder next "
        "to the hf_optim package exists. Reinstall hf-optim (pip install hf-optim) or pass a recipe file path."
    )

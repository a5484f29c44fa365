"""Build hook: install ``hf_optim_autoload.pth`` at the top of site-packages (metadata lives in pyproject.toml).

Python runs ``*.pth`` files found directly in a site directory at start-up; the one line in ours puts a lazy import
hook on ``sys.meta_path`` (see ``hf_optim/integrations/transformers/autoload.py``), so unmodified Trainer scripts accept
``--optim adafactor_v2``. A wheel places files at its root into site-packages, so:

* regular wheels (``pip install .``, ``python -m build``): ``build_py`` copies the file to the root of ``build_lib``;
* editable wheels (``pip install -e .``): setuptools' ``editable_wheel`` does not ship ``build_lib``, so the file is
  added to the root of the unpacked editable wheel instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = Path(__file__).parent / "hf_optim" / "hf_optim_autoload.pth"


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            self.copy_file(str(PTH), str(Path(self.build_lib, PTH.name)), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(str(Path(self.build_lib, PTH.name)))
        return outputs


cmdclass: dict[str, type] = {"build_py": build_py_with_pth}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: no PEP 660 editable wheels
    editable_wheel = None

if editable_wheel is not None:

    class editable_wheel_with_pth(editable_wheel):
        # `_run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)` fills the directory that becomes
        # the wheel's root; files put there land in site-packages. A private hook: if a future setuptools drops
        # it, the editable install simply has no .pth (``import hf_optim`` still registers the names).
        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):  # type: ignore[no-untyped-def]
            result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            shutil.copyfile(PTH, Path(unpacked_wheel, PTH.name))
            return result

    cmdclass["editable_wheel"] = editable_wheel_with_pth

# Data-only folders (no __init__.py) are listed too; hf_optim.recipes.* is the YAML in the repository's top-level
# recipes/ folder (package_dir below).
RECIPE_FOLDERS = sorted(p.name for p in (Path(__file__).parent / "recipes").iterdir() if p.is_dir())
PACKAGES = [
    *find_packages(include=["hf_optim", "hf_optim.*", "mup_integration", "mup_integration.*"]),
    "hf_optim.data",
    "hf_optim.recipes",
    *(f"hf_optim.recipes.{name}" for name in RECIPE_FOLDERS if name != "__pycache__"),
]

setup(cmdclass=cmdclass, packages=PACKAGES, package_dir={"hf_optim.recipes": "recipes"})

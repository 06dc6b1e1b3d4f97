"""Build hook (pyproject.toml: [tool.setuptools] cmdclass): the wheel ships the top-level configs/ as package data.

The recipes live once, in configs/<group>/*.yaml at the top of the repository. `build_py` adds them to the
package's data files as peftkit/recipes/<group>/*.yaml, so a built wheel carries them and
peftkit.paths.configs_dir() finds them beside the code. setuptools' package-dir cannot map a folder
outside the package tree into it while the packages are found automatically, hence this hook. An editable install
copies nothing (setuptools' build_py does no work in editable mode); configs_dir() then reads configs/ in the
repository, so an edited recipe takes effect without a reinstall.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools.command.build_py import build_py

SOURCE = "configs"
PACKAGE = "peftkit.recipes"


class BuildPyWithRecipes(build_py):
    def _get_data_files(self):
        files = super()._get_data_files()
        root = Path(SOURCE)
        if not root.is_dir():
            raise FileNotFoundError(f"{root.resolve()} is missing: the recipes the wheel ships live there")
        recipes = sorted(str(p.relative_to(root)) for p in root.glob("*/*.yaml"))
        build_dir = os.path.join(self.build_lib, *PACKAGE.split("."))
        return [*files, (PACKAGE, SOURCE, build_dir, recipes)]

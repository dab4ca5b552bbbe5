"""The build step pyproject.toml cannot declare: copy the files around the package into the wheel.

``tolaria_otel.cli.assets.SOURCES`` (collector configs, alert rules, dashboards, docs) live at the
repository root, where the tests, the stack and the README use them; the wheel carries a copy under
``tolaria_otel/_assets`` for ``tolaria-otel assets DIR``. MANIFEST.in puts them in the sdist, so a
wheel built from the sdist has them too. Everything else is in pyproject.toml.
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_tolaria_assets", ROOT / "src" / "tolaria_otel" / "cli" / "assets.py")
assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(assets)


class BuildWithAssets(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout (assets.source_root)
            return
        target = Path(self.build_lib) / "tolaria_otel" / assets.PACKAGE_FOLDER
        for path in assets.asset_files(ROOT):
            destination = target / path
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / path, destination)


setup(cmdclass={"build_py": BuildWithAssets})

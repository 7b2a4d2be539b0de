"""Build hook: ships ``dlm_harness_lm_eval.pth`` at the wheel's root (regular and editable installs).

Its one line installs ``harness.lm_eval_hook`` at interpreter start, so that plain
``lm_eval --model harness`` finds the harness's models (lm-eval reads no plugin entry points).
Everything else about the package is in pyproject.toml.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "dlm_harness_lm_eval.pth"  # sorts after setuptools' __editable__ finder .pth, which it needs
PTH_LINE = "import harness.lm_eval_hook; harness.lm_eval_hook.install()\n"


class build_py_with_pth(build_py):
    """build_py, plus the .pth at the root of what becomes the wheel: ``build_lib`` for a regular
    wheel; for an editable one (PEP 660), the unpacked wheel, which setuptools makes the install
    command's ``install_lib`` (build_lib is not packed into an editable wheel)."""

    def run(self) -> None:
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(root).mkdir(parents=True, exist_ok=True)
        Path(root, PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        pth = [] if self.editable_mode else [str(Path(self.build_lib, PTH_NAME))]
        return [*super().get_outputs(include_bytecode), *pth]


setup(cmdclass={"build_py": build_py_with_pth})

"""The compiler half of the "cpu" Triton backend: there is no CPU code generator behind it.

Kernels are meant to run in Triton's interpreter, which never reaches a compiler. If one does
(``TRITON_INTERPRET`` unset), fail with what to set instead of an obscure MLIR error.
"""

from __future__ import annotations

from triton.backends.compiler import BaseBackend, GPUTarget

NO_COMPILER = (
    "deepspec's Triton 'cpu' backend has no compiler: Triton kernels on a CPU run in Triton's "
    "interpreter; set TRITON_INTERPRET=1 in the vLLM process's environment"
)


class CPUInterpreterBackend(BaseBackend):
    @staticmethod
    def supports_target(target: GPUTarget) -> bool:
        return target.backend == "cpu"

    def hash(self) -> str:
        return "deepspec-cpu-interpreter"

    def parse_options(self, options: dict):
        raise RuntimeError(NO_COMPILER)

    def add_stages(self, stages: dict, options, language=None) -> None:
        raise RuntimeError(NO_COMPILER)

    def load_dialects(self, context) -> None:
        pass

    def get_module_map(self) -> dict:
        return {}

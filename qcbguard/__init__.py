"""qcbguard's command line: the main job on an embedded default model, and (as they land) scan and report commands.

The numerics live in `qcbguard_kernels` (source folder kernels/), the vLLM adapter in `vllm_qcbguard`, the GGUF
adapter in `gguf_tools`; this package only wires them to a terminal.
"""

__version__ = "0.1.0"

"""qcbguard: hardening quantized LLM serving against quantization-conditioned backdoors.

The source folder `kernels/` is installed as the import package `qcbguard_kernels`: PyPI's `kernels` (Hugging Face's
hub kernels, imported by transformers) owns the name `kernels`, and neither package may shadow the other.
"""

from setuptools import setup

setup(
    packages=[
        "qcbguard_kernels",
        "qcbguard_kernels.formats",
        "qcbguard_kernels.hardening",
        "vllm_qcbguard",
        "gguf_tools",
        "qcbguard",
    ],
    package_dir={
        "qcbguard_kernels": "kernels",
        "qcbguard_kernels.formats": "kernels/formats",
        "qcbguard_kernels.hardening": "kernels/hardening",
        "qcbguard_kernels.detection": "kernels/detection",
    },
)

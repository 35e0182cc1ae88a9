"""qcbguard: hardening quantized LLM serving against quantization-conditioned backdoors.

The source folder `kernels/` is installed as the import package `qcbguard_kernels`: PyPI's `kernels` (Hugging Face's
hub kernels, imported by transformers and bitsandbytes) owns the name `kernels`, and neither package may shadow the
other.
"""

from setuptools import find_packages, setup

KERNEL_PACKAGES = find_packages(include=["kernels", "kernels.*"])
INSTALLED_AS = {p: "qcbguard_kernels" + p[len("kernels") :] for p in KERNEL_PACKAGES}
ADAPTERS = find_packages(include=["vllm_qcbguard*", "gguf_tools*", "qcbguard", "qcbguard.*"])

setup(
    packages=[*INSTALLED_AS.values(), *ADAPTERS],
    package_dir={installed: source.replace(".", "/") for source, installed in INSTALLED_AS.items()},
)

"""GGUF adapter: read, quantize (hardened, or byte-identical to llama-quantize), scan and dequantize GGUF files.

- reader.py: a validating GGUF v2/v3 reader over a memory map (lazy tensor data, fast on large vocabularies)
- writer.py: GGUF v3 in llama-quantize's layout, streamed one tensor at a time
- mixtures.py: llama-quantize's per-tensor type choice for each output type
- quantize.py / scan.py / dequantize.py: the jobs; cli.py: the `qcbguard-gguf` command

Imports nothing from the vLLM adapter; the numerics come from qcbguard_kernels.
"""

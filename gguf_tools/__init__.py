"""GGUF adapter (reading, rewriting, the qcbguard-gguf command).

Not implemented yet: the GGUF formats' byte-exact references live in qcbguard_kernels.formats; the file tool that uses
them lands with the GGUF work item.
"""

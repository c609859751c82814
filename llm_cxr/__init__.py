"""llm-cxr: teach a language model to read and draw chest X-rays, and explain what it did."""

__version__ = "0.1.0"

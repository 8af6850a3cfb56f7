"""lowbit: make large language models small, write what real runtimes load, measure what was lost."""

__version__ = "0.1.0"

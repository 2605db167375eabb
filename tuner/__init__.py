"""servetune: tune LLM inference servers against captured traffic traces."""

__version__ = "0.1.0"

"""sinkserve: endless multi-tenant chat on bounded memory (StreamingLLM served with Ray Serve)."""

__version__ = "0.1.0"

"""sinkserve beside llama.cpp and vLLM's CPU build, in one interleaved run (`make bench-peers`).

Each system runs in its own process (the peers in their own virtualenvs under `.peers/`), is handed the same token
ids, and answers with one JSON object. The workers import only the standard library and their own system, so this
package's `workload` module must stay free of torch and of sinkserve.
"""

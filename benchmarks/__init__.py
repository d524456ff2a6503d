"""sinkserve benchmarks: the StreamingLLM paper's experiments and the peer baselines, on this machine.

Run ``python -m benchmarks.run`` (or ``make bench``); ``--quick`` is the development mode. Every figure in
docs/benchmarks.md comes from the run that wrote it.
"""

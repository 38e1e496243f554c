"""Benchmark harness for clawbus: a fast fake OpenAI-compatible upstream
(:mod:`bench.upstream`), a cheap SSE load client (:mod:`bench.streamclient`), ``wrk``
for non-streaming load (:mod:`bench.wrk`), process helpers (:mod:`bench.procs`,
:mod:`bench.systems`) and the one command that runs it all (``python -m bench.run``).

See docs/BENCHMARKS.md.
"""

"""Trace-driven load generator for OpenAI-compatible servers (`kvbm replay`).

    prompts.py    a trace request -> token ids with the trace's prefix structure
    sender.py     paced, streaming /v1/completions requests; per-request timings
    report.py     percentiles, the server's /metrics counters, JSON and text report, CDF plot
    command.py    the `kvbm replay` subcommand

The tool a user runs before and after installing kvbm: it measures what a serving stack gives
its clients (time to first token, inter-token latency, end-to-end latency, throughput) under a
real workload's arrival times and prefix sharing.
"""

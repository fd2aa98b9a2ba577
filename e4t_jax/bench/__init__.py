"""The benchmarks, fenced off from the library: `harness` (what every benchmark measures with),
`personalize` (`e4t bench personalize`: compile cost, per-concept latency, memory; abstract full-size
analysis), `full` (`e4t bench full`: the full-size programs executed on an accelerator) and
`torch_reference` (the PyTorch implementations compared against in the same run).
"""

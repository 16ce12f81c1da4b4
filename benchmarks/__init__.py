"""Speed and quality benchmarks: harnesses, metrics, reports and plots."""

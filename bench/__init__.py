"""The edge-proxy benchmark harness: `make bench` (or `python bench/run.py --help`)."""

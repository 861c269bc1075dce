"""fastgen's peers, run beside it on the same requests: transformers `generate` and its continuous batching (hf),
vLLM in its own virtual environment (vllm), fastgen's own engine timed through the offline pipeline with its limit
probes (offline), and servers started as processes (servers). The experiments that compare fastgen with them
(experiments/bench_vs_hf.py, bench_peers.py, ray_replica_scaling.py, serve_neighbour_gap.py) are thin scripts
over these modules; nothing here is a fastgen dependency (transformers is, vLLM never is)."""

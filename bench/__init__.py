"""kdq benchmarks (`make bench`): training throughput, inference latency, and a floor from MACs and the CPU peak."""

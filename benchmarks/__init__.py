"""Side-by-side benchmarks of spkenc and its peers; run them with `python -m benchmarks.run`."""

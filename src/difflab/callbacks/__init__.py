"""Lightning callbacks: sample grids, throughput, (and FID, see metrics)."""

"""FID/KID with torchmetrics, real-statistics caching, and the feature extractors they use."""

"""Image sources, transforms and the LightningDataModule."""

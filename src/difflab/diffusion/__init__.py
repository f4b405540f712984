"""The noise process, EMA weights, sampling and the LightningModule that ties them to the UNet."""

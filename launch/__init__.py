"""Training: `python -m launch CONFIG.yaml` or `accelerate launch [flags] -m launch CONFIG.yaml`."""

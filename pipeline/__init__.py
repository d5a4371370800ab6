"""retina-vae pipeline: DVC stages, params, CLI and MLflow glue around :mod:`vae_core`."""

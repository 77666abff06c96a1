"""maskfreevis_jax.models."""

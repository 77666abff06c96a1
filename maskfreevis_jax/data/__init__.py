"""maskfreevis_jax.data."""

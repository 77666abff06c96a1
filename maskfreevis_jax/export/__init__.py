"""maskfreevis_jax.export."""

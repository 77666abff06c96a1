"""maskfreevis_jax.evaluation."""

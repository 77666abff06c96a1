"""Developer tools of maskfreevis_jax (not installed with the package)."""

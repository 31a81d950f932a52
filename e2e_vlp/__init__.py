"""E2E-VLP: end-to-end vision-language pre-training enhanced by visual learning, in JAX."""

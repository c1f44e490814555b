"""Fast JAX backend (issue #3). Empty until it lands."""

"""Development-only helpers: a local control plane and a Job executor. Never used in production."""

"""Development-only helpers: a local control plane, and a local kubelet that runs stage Jobs as
processes. Never used in production."""

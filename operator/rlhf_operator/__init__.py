"""rlhf-operator: runs RLHF pipelines on Kubernetes from an RLHFRun resource.

The importable package is ``rlhf_operator`` (the folder ``operator/`` is only its home in
the repository: ``operator`` is a standard-library module and must not be shadowed).
"""

__version__ = "0.1.0"

"""Test-only fake stages: shadow the real ``rlhf_stages`` package (via the local kubelet's
``--python-path``) to exercise the operator's lifecycle in seconds. They follow the stage protocol
(docs/stage-protocol.md): idempotent outputs, checkpoints, progress file, SIGTERM, termination
message, exit codes. The real pipeline is tested by tests/operator/test_tiny_pipeline.py."""

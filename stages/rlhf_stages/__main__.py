"""``python -m rlhf_stages <stage> --config FILE`` (also the ``rlhf-stage`` console script).

See ``rlhf_stages.runtime.entrypoint`` for what happens and how stages plug in.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from rlhf_stages.runtime.entrypoint import main as entrypoint_main
    from rlhf_stages.runtime.libraries import leave_out_unused

    # This is the stage's own process (python -m rlhf_stages, rlhf-stage, torchrun's workers): what
    # the spec never uses can be left out before anything imports it (runtime/libraries.py).
    leave_out_unused(sys.argv[1:] if argv is None else argv)
    return entrypoint_main(argv)


if __name__ == "__main__":
    sys.exit(main())

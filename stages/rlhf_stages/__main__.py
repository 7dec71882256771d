"""``python -m rlhf_stages <stage> --config FILE`` (also the ``rlhf-stage`` console script).

See ``rlhf_stages.runtime.entrypoint`` for what happens and how stages plug in.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from rlhf_stages.runtime.entrypoint import main as entrypoint_main

    return entrypoint_main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""python -m rlhf_operator.cli: same as the rlhfctl command."""

import sys

from . import main

sys.exit(main())

"""``python -m vkick`` → the ``vkick`` command."""

import sys

from vkick.cli import main

sys.exit(main())

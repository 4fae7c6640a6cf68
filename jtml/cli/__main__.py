"""``python -m jtml.cli``: the same as the ``jtml`` command."""

import sys

from jtml.cli.main import main

sys.exit(main())

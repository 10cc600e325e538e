"""``python -m fedsea.cli``: the same as the ``fedsea`` command."""

import sys

from fedsea.cli.main import main

sys.exit(main())

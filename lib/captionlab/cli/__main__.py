"""`python -m captionlab.cli ...` = the `captionlab` command."""

import sys

from captionlab.cli import main

sys.exit(main())

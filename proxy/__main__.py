"""`python -m proxy` is the `edge-proxy` command."""

import sys

from proxy.cli import main

sys.exit(main())

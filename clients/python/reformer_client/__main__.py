"""`python -m reformer_client` = the `reformer-client` command."""

import sys

from reformer_client.cli import main

sys.exit(main())

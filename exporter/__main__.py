"""``python -m exporter``: run the exporter (see exporter.main)."""

import sys

from exporter.main import main

sys.exit(main())

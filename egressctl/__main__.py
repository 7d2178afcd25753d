import sys

from egressctl.cli import main

sys.exit(main())

import sys

from ediffi.cli import main

sys.exit(main())

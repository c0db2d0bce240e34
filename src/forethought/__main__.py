import sys

from forethought.cli import main

sys.exit(main())

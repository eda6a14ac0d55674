import sys

from overlayroot.cli import main

sys.exit(main())

import sys

from overlayroot.commands.cli import main

sys.exit(main())

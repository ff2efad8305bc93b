import sys

from pyvmm.cli import main

sys.exit(main())

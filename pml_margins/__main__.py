import sys

from pml_margins.cli import main

sys.exit(main())

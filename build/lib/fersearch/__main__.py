import sys

from fersearch.cli import main

sys.exit(main())

import sys

from sva.cli import main

sys.exit(main())

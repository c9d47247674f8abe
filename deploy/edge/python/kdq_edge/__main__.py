import sys

from kdq_edge.cli import main

sys.exit(main())

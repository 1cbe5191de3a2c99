import sys

from lcsm.cli.main import main

sys.exit(main())

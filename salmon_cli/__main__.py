import sys

from salmon_cli.main import main

sys.exit(main())

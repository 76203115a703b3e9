import sys

from uniguard.cli import main

sys.exit(main())

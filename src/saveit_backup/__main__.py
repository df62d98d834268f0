import sys

from saveit_backup.cli import main

sys.exit(main())

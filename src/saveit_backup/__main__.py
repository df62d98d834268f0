import sys

from saveit_backup.entry import main

sys.exit(main())

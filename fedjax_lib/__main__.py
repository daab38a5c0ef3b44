import sys

from fedjax_lib.cli import main

sys.exit(main())

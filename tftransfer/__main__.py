import sys

from tftransfer.cli import main

sys.exit(main())

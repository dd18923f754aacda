import sys

from spkenc.cli import main

sys.exit(main())

"""python -m client fuse --source S --target T --out O [...] | python -m client verify IMAGE"""

import sys

from client.cli import main

sys.exit(main())

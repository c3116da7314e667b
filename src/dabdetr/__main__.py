import sys

from dabdetr.cli import main

sys.exit(main(sys.argv[1:]))

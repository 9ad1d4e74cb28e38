import sys

try:
    from .cli import main

    sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C before the command's own handling (while importing)
    sys.exit(130)

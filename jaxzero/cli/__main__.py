import sys

from jaxzero.cli.main import main

sys.exit(main())

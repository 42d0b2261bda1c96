import sys

from bora_client.cli import main

sys.exit(main())

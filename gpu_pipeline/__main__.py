import sys

from gpu_pipeline.cli import main

sys.exit(main())

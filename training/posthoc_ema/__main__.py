import sys

from training.posthoc_ema.reconstruct import main

sys.exit(main())

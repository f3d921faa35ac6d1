"""``python -m llava_contrastive <verb> ...`` = ``llava-contrastive <verb> ...``."""
import sys

from llava_contrastive.cli import main

sys.exit(main())

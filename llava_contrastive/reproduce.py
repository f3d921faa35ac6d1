"""`python -m llava_contrastive.reproduce`: the two-stage reproduction (NTP-only vs joint stage 1).

Kept at this path for the documented commands; the code is in ``llava_contrastive.evaluation.reproduce``.
"""
import sys

from llava_contrastive.evaluation.reproduce import main

if __name__ == "__main__":
    sys.exit(main())

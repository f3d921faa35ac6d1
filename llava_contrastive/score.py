"""`python -m llava_contrastive.score`: benchmark scores of an answers file (code in ``evaluation/score.py``)."""
import sys

from llava_contrastive.evaluation.score import main

if __name__ == "__main__":
    sys.exit(main())

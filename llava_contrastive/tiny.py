"""`python -m llava_contrastive.tiny`: the tiny offline models and data.

Kept at this path for the documented commands; the code is in ``llava_contrastive.dev.tiny``.
"""
import sys

from llava_contrastive.dev.tiny import TinyAssets, build_tiny_assets, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

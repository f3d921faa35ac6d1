"""`python -m llava_contrastive.eval`: held-out alignment on the upstream host.

Kept at this path for the documented commands; the code is in ``llava_contrastive.hosts.llava.eval``.
"""
import sys

from llava_contrastive.hosts.llava.eval import main

if __name__ == "__main__":
    sys.exit(main())

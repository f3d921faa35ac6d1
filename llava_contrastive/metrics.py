"""Public name of the alignment metrics (code: ``llava_contrastive.core.metrics``)."""
from llava_contrastive.core.metrics import *  # noqa: F401,F403
from llava_contrastive.core.metrics import modality_gap, retrieval_recall  # noqa: F401

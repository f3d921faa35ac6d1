"""Public name of the contrastive losses (code: ``llava_contrastive.core.losses``)."""
from llava_contrastive.core.losses import info_nce_loss, siglip_loss  # noqa: F401

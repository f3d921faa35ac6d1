"""The joint loss's logged means (llava_contrastive/train_logs.py), shared by both hosts' trainers."""
import types

import torch

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.core.head import ContrastiveHead
from llava_contrastive.training.logs import JointLossStats, joint_loss_means


def output(ntp, con, rows, i2t=None, t2i=None):
    t = torch.tensor
    return types.SimpleNamespace(ntp_loss=t(ntp), contrastive_loss=t(con), contrastive_rows=t(float(rows)),
                                 i2t_accuracy=None if i2t is None else t(i2t),
                                 t2i_accuracy=None if t2i is None else t(t2i))


def test_means_are_per_micro_batch_and_accuracy_row_weighted():
    stats = JointLossStats()
    stats.add(output(1.0, 3.0, 8, 0.5, 0.25))
    stats.add(output(2.0, 1.0, 4, 1.0, 1.0))
    stats.add(output(3.0, 2.0, 0))  # no pairs: counts for the loss means, not for accuracy
    sums = stats.pop("cpu", extra={"runtime_skips": 2})
    assert sums["world"] == 1 and sums["runtime_skips"] == 2 and sums["steps"] == 3 and sums["rows"] == 12
    head = ContrastiveHead(ContrastiveArguments(), 8)
    logs = joint_loss_means(sums, head)
    assert logs["ntp_loss"] == 2.0 and logs["contrastive_loss"] == 2.0
    assert logs["i2t_acc"] == round((0.5 * 8 + 1.0 * 4) / 12, 4) and logs["t2i_acc"] == round((0.25 * 8 + 4) / 12, 4)
    assert logs["logit_scale"] == round(float(head.logit_scale()), 4)
    assert joint_loss_means(stats.pop("cpu"), head) == {}  # pop reset the sums

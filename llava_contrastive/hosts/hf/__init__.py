"""Second host: transformers' native ``LlavaForConditionalGeneration`` (stack M, transformers 5.x).

* ``convert``: upstream stage-1 projector (``mm_projector.bin``) <-> native projector weights, and
  ``build_native_llava`` to assemble a native LLaVA checkpoint + processor from an LLM and a CLIP tower.
* ``model``: ``ContrastiveLlavaForConditionalGeneration`` (NTP + weight * contrastive in one pass).
* ``train``: ``python -m llava_contrastive.hosts.hf.train`` (transformers.Trainer, stage 1).
"""

"""Second host: transformers' native ``LlavaForConditionalGeneration`` (stack M, transformers 5.x).

* ``convert``: upstream stage-1 projector (``mm_projector.bin``) <-> native projector weights, and
  ``build_native_llava`` to assemble a native LLaVA checkpoint + processor from an LLM and a CLIP or SigLIP tower.
* ``model``: ``ContrastiveLlavaForConditionalGeneration`` (NTP + weight * contrastive in one pass).
* ``train`` (+ ``checkpoint``): ``python -m llava_contrastive.hosts.hf.train`` (transformers.Trainer,
  stage 1, resumable projector-only checkpoints).
* ``eval``: ``python -m llava_contrastive.hosts.hf.eval`` (held-out retrieval, as ``llava_contrastive.evaluation.alignment``).
* ``lora`` + ``instruct_data`` + ``finetune``: stage 2, ``python -m llava_contrastive.hosts.hf.finetune``
  (LoRA / QLoRA 8- and 4-bit on upstream's v1 conversations; merge and export).
* ``launch``: process set-up shared by the entry points.
"""

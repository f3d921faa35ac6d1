"""ContrastiveLlavaForConditionalGeneration: transformers' native LLaVA plus an InfoNCE/SigLIP term.

One forward pass yields both losses. The projected image tokens are captured from the pass itself
(a forward hook on ``model.multi_modal_projector``; nothing is encoded twice), caption tokens are
``labels != -100`` minus the image placeholders (``input_ids == config.image_token_id``) and the
trailing whitespace separator, and the core (``llava_contrastive.core.losses/pooling/head``) pools,
gathers and scores them -- the same definitions as the upstream host (hosts/llava/model.py):

* text  = mean of the frozen LLM input embeddings of the caption tokens
          (or, ``--contrastive_text_source llm``, a no-grad text-only pass over the prompt)
* image = mean of the projected image tokens of the row's single image
          (or, ``--contrastive_image_source llm``, LLM hidden states at the image positions)

Rows with no image or more than one image get no contrastive pair (they keep their NTP loss).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from transformers import LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from llava_contrastive.core.pooling import caption_keys, pool, strip_trailing
from llava_contrastive.hosts.common import ContrastiveModelMixin, contrastive_output_class

IGNORE_INDEX = -100


ContrastiveLlavaOutput = contrastive_output_class(LlavaCausalLMOutputWithPast, "ContrastiveLlavaOutput", __name__)


class ContrastiveLlavaForConditionalGeneration(ContrastiveModelMixin, LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose training forward (``labels`` given, contrastive
    enabled) returns ``loss = ntp + contrastive_weight * contrastive``. Saved checkpoints are plain
    native LLaVA checkpoints plus ``config.contrastive`` and the ``contrastive_head.*`` weights."""

    def __init__(self, config):
        super().__init__(config)
        self._captured: Optional[List[torch.Tensor]] = None
        self.model.multi_modal_projector.register_forward_hook(self._capture_hook)
        self._init_contrastive_state(config)

    # ---- what the shared set-up needs from this host (hosts/common.py) --------------------
    def _contrastive_hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    def _text_decoder(self) -> torch.nn.Module:
        return self.model.language_model

    def _capture_hook(self, module, inputs, output):
        if self._captured is not None:
            self._captured.append(output)

    # ---- forward --------------------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, output_hidden_states=None,
                **kwargs):
        args = self.contrastive_args
        if args is None or not args.enabled or labels is None or input_ids is None or inputs_embeds is not None:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   inputs_embeds=inputs_embeds, labels=labels,
                                   output_hidden_states=output_hidden_states, **kwargs)
        want_hidden = args.contrastive_image_source == "llm"
        out, features = self._pass(input_ids, pixel_values, attention_mask, position_ids, past_key_values, labels,
                                   output_hidden_states=bool(output_hidden_states) or want_hidden, **kwargs)
        image_emb, text_emb, keys, _ = self._pair_embeddings(input_ids, labels, features,
                                                             out.hidden_states if want_hidden else None)
        terms = self.contrastive_head.joint(out.loss, image_emb, text_emb, keys, weight=args.contrastive_weight,
                                            gather=args.contrastive_gather, update_queue=self.training)
        return ContrastiveLlavaOutput(
            loss=terms.loss, logits=out.logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states if output_hidden_states else None, attentions=out.attentions,
            image_hidden_states=out.image_hidden_states,
            ntp_loss=terms.ntp, contrastive_loss=terms.contrastive, logit_scale=terms.logit_scale,
            contrastive_rows=terms.rows, i2t_accuracy=terms.i2t, t2i_accuracy=terms.t2i)

    def _pass(self, input_ids, pixel_values, attention_mask, position_ids, past_key_values, labels,
              output_hidden_states=False, **kwargs):
        """The native forward, keeping the projector output it computed ([n_images, T, D])."""
        kwargs.pop("return_dict", None)
        self._captured = []
        try:
            out = super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values, labels=labels,
                                  output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
            captured = self._captured
        finally:
            self._captured = None
        features = captured[-1] if captured else None
        if features is not None and features.dim() == 2:  # (1, T, D) squeezed by some paths
            features = features.unsqueeze(0)
        return out, features

    @torch.no_grad()
    def embed_pairs(self, input_ids, attention_mask, labels, pixel_values):
        """Evaluation: (image [n, D], text [n, D], keys [n] or None, rows [n], NTP loss) in the space
        the contrastive term scores (head included)."""
        if self.contrastive_args is None:
            raise RuntimeError("call init_contrastive(args, tokenizer) first (it defines the embeddings)")
        want_hidden = self.contrastive_args.contrastive_image_source == "llm"
        out, features = self._pass(input_ids, pixel_values, attention_mask, None, None, labels,
                                   output_hidden_states=want_hidden, use_cache=False)
        image, text, keys, rows = self._pair_embeddings(input_ids, labels, features,
                                                        out.hidden_states if want_hidden else None)
        return image, text, keys, rows, out.loss

    # ---- embeddings -----------------------------------------------------------------------
    def caption_mask(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mask = labels.ne(IGNORE_INDEX) & input_ids.ne(self.config.image_token_id)
        if self._separator_ids is not None:
            mask = strip_trailing(input_ids, mask, self._separator_ids.to(input_ids.device))
        return mask

    def _pair_embeddings(self, input_ids, labels, features, hidden_states):
        args = self.contrastive_args
        hidden = self.config.text_config.hidden_size
        image_mask = input_ids.eq(self.config.image_token_id)
        caption_mask = self.caption_mask(input_ids, labels)
        if features is None:
            valid = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            feature_index = valid.long()
        else:
            tokens_per_image = features.shape[1]
            n_images = image_mask.sum(1) // tokens_per_image
            valid = image_mask.sum(1).eq(tokens_per_image)
            feature_index = torch.cumsum(n_images, 0) - n_images
        valid = valid & caption_mask.any(dim=1)
        rows = torch.nonzero(valid).flatten()
        if rows.numel() == 0:
            image_emb, text_emb = self._empty_pair(hidden, features)
            keys = torch.zeros(0, dtype=torch.long, device=input_ids.device) if args.contrastive_mask_duplicates else None
            return self.contrastive_head.project(image_emb, text_emb) + (keys, rows)
        if args.contrastive_image_source == "projector":
            tokens = features.index_select(0, feature_index[rows].to(features.device))
            image_emb = pool(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device),
                             args.image_pooling)
        else:
            states = hidden_states[args.contrastive_image_layer]
            image_emb = pool(states[rows], image_mask[rows], args.image_pooling)
        text_emb = self._text_embeddings(input_ids[rows], caption_mask[rows])
        keys = caption_keys(input_ids[rows], caption_mask[rows]) if args.contrastive_mask_duplicates else None
        return self.contrastive_head.project(image_emb, text_emb) + (keys, rows)

    def _empty_pair(self, hidden, features):
        """[0, D] pairs with the dtype / autograd status other ranks' rows have."""
        weight = self.model.multi_modal_projector.linear_2.weight
        if features is not None:
            image = features[:0, 0, :] if features.dim() == 3 else features[:0]
        else:
            image = torch.zeros(0, hidden, dtype=weight.dtype, device=weight.device,
                                requires_grad=torch.is_grad_enabled() and weight.requires_grad)
        text_weight = self.get_input_embeddings().weight
        text = torch.zeros(0, hidden, dtype=text_weight.dtype, device=text_weight.device,
                           requires_grad=torch.is_grad_enabled() and text_weight.requires_grad
                           and self.contrastive_args.contrastive_text_source == "input_embeds")
        return image, text


# ---- helpers (pure functions of tensors; same definitions as the upstream host) --------------
def _register_checkpoint_renaming() -> None:
    """transformers 5.x renames legacy LLaVA checkpoint keys (``language_model.lm_head`` ->
    ``lm_head`` ...) on load, but skips classes defined outside ``transformers.`` unless they are
    registered: without this, a subclass silently re-initialises ``lm_head``."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping)
    except ImportError:  # older transformers: the class attribute mapping applies
        return
    mapping = get_checkpoint_conversion_mapping("llava")
    if mapping is not None:
        register_checkpoint_conversion_mapping(ContrastiveLlavaForConditionalGeneration.__name__, mapping,
                                               overwrite=True)


_register_checkpoint_renaming()

"""The contrastive LLaVA classes of the upstream host: upstream's ``LlavaLlamaForCausalLM`` and
``LlavaMistralForCausalLM`` plus an InfoNCE/SigLIP term.

One forward pass yields both losses: the projected image tokens are captured from the pass
itself (``encode_images`` is overridden, nothing is encoded twice), caption ids come from the
labels (``labels != -100`` in the ``plain`` template), and the core pools, gathers and scores them.
``ContrastiveLlavaAutoForCausalLM.from_pretrained`` picks the class from the checkpoint's config
(Mistral where it says so, as forks do; Llama otherwise), which is what upstream's ``train()`` gets
in place of ``LlavaLlamaForCausalLM``. Upstream's MPT class cannot run under the pinned stack (its
``train()`` indexes ``config.attn_config`` as a dict, which transformers' own ``MptConfig`` is not):
asking for it is a clear error.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.core.pooling import caption_keys, pool, strip_trailing
from llava_contrastive.hosts.common import ContrastiveModelMixin, contrastive_output_class
from llava_contrastive.hosts.llava.compat import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaConfig, LlavaLlamaForCausalLM,
                                                  LlavaMistralConfig, LlavaMistralForCausalLM)
from llava_contrastive.training.preflight import upstream_family


class _UpstreamTypeOnSave:
    """Every saved config.json (stage 1 and 2, LoRA or full) says upstream's type and class
    (``upstream_config_class``), so upstream's load_pretrained_model takes it without this plugin;
    the contrastive settings travel in the ``contrastive`` attribute."""

    upstream_config_class: type
    upstream_architecture: str

    def to_dict(self):
        d = super().to_dict()
        d["model_type"], d["architectures"] = self.upstream_config_class.model_type, [self.upstream_architecture]
        return d


class ContrastiveLlavaConfig(_UpstreamTypeOnSave, LlavaConfig):
    """Upstream's LlavaConfig (Llama family) under its own model_type."""

    model_type = "llava_llama_contrastive"
    upstream_config_class, upstream_architecture = LlavaConfig, "LlavaLlamaForCausalLM"


class ContrastiveLlavaMistralConfig(_UpstreamTypeOnSave, LlavaMistralConfig):
    """Upstream's LlavaMistralConfig under its own model_type."""

    model_type = "llava_mistral_contrastive"
    upstream_config_class, upstream_architecture = LlavaMistralConfig, "LlavaMistralForCausalLM"


ContrastiveCausalLMOutput = contrastive_output_class(CausalLMOutputWithPast, "ContrastiveCausalLMOutput", __name__)


def rows_with_one_image(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [B] bool, feature index [B] long) following upstream's splice: every row consumes
    max(1, n_images) image features (text-only rows consume the collator's dummy image)."""
    n_images = (input_ids == IMAGE_TOKEN_INDEX).sum(dim=1)
    consumed = n_images.clamp(min=1)
    feature_index = torch.cumsum(consumed, 0) - consumed
    return n_images == 1, feature_index


def image_position_mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        valid: torch.Tensor, tokens_per_image: torch.Tensor, seq_len: int,
                        new_attention_mask: Optional[torch.Tensor], padding_side: str) -> torch.Tensor:
    """[B, seq_len] bool: positions of the (single) image's tokens in the spliced sequence
    (upstream drops padding, splices the image tokens in place of IMAGE_TOKEN_INDEX, re-pads)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.bool()
    image_pos = (input_ids == IMAGE_TOKEN_INDEX).int().argmax(dim=1, keepdim=True)
    start = attention_mask.long().cumsum(1).gather(1, image_pos) - 1  # index among unpadded tokens
    if padding_side == "left" and new_attention_mask is not None:
        start = start + seq_len - new_attention_mask.long().sum(1, keepdim=True)
    end = start + tokens_per_image.to(start.device).reshape(-1, 1)
    positions = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
    return (positions >= start) & (positions < end) & valid.reshape(-1, 1)


class ContrastiveLlavaCausalLMBody(ContrastiveModelMixin):
    """The contrastive forward of an upstream LLaVA causal-LM class (mixed in before it)."""

    def __init__(self, config):
        super().__init__(config)
        self._capture_image_features = False
        self._captured_image_features: Optional[torch.Tensor] = None
        self._init_contrastive_state(config)

    # ---- what the shared set-up needs from this host (hosts/common.py) --------------------
    def _contrastive_hidden_size(self) -> int:
        return self.config.hidden_size

    def _text_decoder(self) -> nn.Module:
        return self.get_model()

    def _check_contrastive_args(self, args: ContrastiveArguments) -> None:
        if args.enabled and getattr(self.config, "mm_use_im_start_end", False):
            raise ValueError(
                "--mm_use_im_start_end True trains the input embeddings, but the contrastive term "
                "assumes a frozen text side. Use --mm_use_im_start_end False (upstream's v1.5 "
                "recipe) or --contrastive_weight 0.")

    # ---- capture --------------------------------------------------------------------------
    def encode_images(self, images):
        features = super().encode_images(images)
        if self._capture_image_features:
            self._captured_image_features = features
        return features

    # ---- forward --------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, images=None, image_sizes=None, return_dict=None):
        args = self.contrastive_args
        if args is None or not args.enabled or labels is None or inputs_embeds is not None:
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                use_cache=use_cache, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, images=images,
                image_sizes=image_sizes, return_dict=return_dict)

        want_hidden = args.contrastive_image_source == "llm"
        out, features, new_attention_mask = self._multimodal_pass(
            input_ids, attention_mask, position_ids, past_key_values, labels, images, image_sizes,
            use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=bool(output_hidden_states) or want_hidden)
        image_emb, text_emb, keys = self._pair_embeddings(
            input_ids, attention_mask, labels, images, features,
            out.hidden_states if (want_hidden and features is not None) else None,
            new_attention_mask)
        terms = self.contrastive_head.joint(out.loss, image_emb, text_emb, keys, weight=args.contrastive_weight,
                                            gather=args.contrastive_gather, update_queue=self.training)
        return ContrastiveCausalLMOutput(
            loss=terms.loss, logits=out.logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions,
            ntp_loss=terms.ntp, contrastive_loss=terms.contrastive, logit_scale=terms.logit_scale,
            contrastive_rows=terms.rows, i2t_accuracy=terms.i2t, t2i_accuracy=terms.t2i)

    # ---- embeddings -----------------------------------------------------------------------
    def _multimodal_pass(self, input_ids, attention_mask, position_ids, past_key_values, labels, images,
                         image_sizes, *, use_cache=None, output_attentions=None, output_hidden_states=None):
        """Upstream's splice + LLM forward, keeping the projected image tokens it computed."""
        self._capture_image_features = True
        self._captured_image_features = None
        try:
            (_, new_position_ids, new_attention_mask, past_key_values, embeds, new_labels) = \
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
            features = self._captured_image_features
        finally:
            self._capture_image_features = False
            self._captured_image_features = None
        if embeds is None:  # no images in this batch: plain NTP, empty contrastive term
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  labels=labels, use_cache=use_cache, return_dict=True)
            return out, None, attention_mask
        out = super().forward(
            input_ids=None, attention_mask=new_attention_mask, position_ids=new_position_ids,
            past_key_values=past_key_values, inputs_embeds=embeds, labels=new_labels, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True)
        return out, features, new_attention_mask

    @torch.no_grad()
    def embed_pairs(self, input_ids, attention_mask, labels, images, image_sizes=None):
        """Evaluation: (image [n, D], text [n, D], caption keys [n] or None, row index [n], NTP loss)
        for the rows holding one image, in the space the contrastive term scores (head included)."""
        if self.contrastive_args is None:
            raise RuntimeError("call init_contrastive(args, tokenizer) first (it defines the embeddings)")
        want_hidden = self.contrastive_args.contrastive_image_source == "llm"
        out, features, new_attention_mask = self._multimodal_pass(
            input_ids, attention_mask, None, None, labels, images, image_sizes, use_cache=False,
            output_hidden_states=want_hidden)
        image, text, keys, rows = self._pair_embeddings(
            input_ids, attention_mask, labels, images, features,
            out.hidden_states if (want_hidden and features is not None) else None, new_attention_mask,
            return_rows=True)
        return image, text, keys, rows, out.loss

    def _pair_embeddings(self, input_ids, attention_mask, labels, images, features, hidden_states,
                         new_attention_mask, return_rows: bool = False):
        """One image and one text embedding per row that holds exactly one image."""
        args = self.contrastive_args
        hidden = self.config.hidden_size
        if features is None:
            valid = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        else:
            valid, feature_index = rows_with_one_image(input_ids)

        caption_mask = labels.ne(IGNORE_INDEX) & input_ids.ne(IMAGE_TOKEN_INDEX)
        if self._separator_ids is not None:
            caption_mask = strip_trailing(input_ids, caption_mask, self._separator_ids.to(input_ids.device))
        valid = valid & caption_mask.any(dim=1)
        rows = torch.nonzero(valid).flatten()

        if rows.numel() == 0 or features is None:  # nothing to pair on this rank: empty term
            image_emb, text_emb = self._empty_pair(hidden)
            keys = torch.zeros(0, dtype=torch.long, device=input_ids.device) if args.contrastive_mask_duplicates else None
            rows = torch.zeros(0, dtype=torch.long, device=input_ids.device)
            return self.contrastive_head.project(image_emb, text_emb) + ((keys, rows) if return_rows else (keys,))

        image_emb = self._image_embeddings(input_ids, attention_mask, images, features, hidden_states,
                                           new_attention_mask, valid, feature_index, rows)
        text_emb = self._text_embeddings(input_ids[rows], caption_mask[rows])
        keys = caption_keys(input_ids[rows], caption_mask[rows]) if args.contrastive_mask_duplicates else None
        return self.contrastive_head.project(image_emb, text_emb) + ((keys, rows) if return_rows else (keys,))

    def _empty_pair(self, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[0, D] embeddings with the dtype and autograd status other ranks' rows have, so that
        every rank takes the same path through the gather (a mismatch would hang a collective)."""
        weight = next(self.get_model().mm_projector.parameters())
        text_weight = self.get_model().embed_tokens.weight
        grad = torch.is_grad_enabled()
        image = torch.zeros(0, hidden, device=weight.device, dtype=weight.dtype,
                            requires_grad=grad and weight.requires_grad)
        text_grad = self.contrastive_args.contrastive_text_source == "input_embeds" and text_weight.requires_grad
        text = torch.zeros(0, hidden, device=weight.device, dtype=text_weight.dtype,
                           requires_grad=grad and text_grad)
        return image, text

    def _image_embeddings(self, input_ids, attention_mask, images, features, hidden_states,
                          new_attention_mask, valid, feature_index, rows):
        args = self.contrastive_args
        if args.contrastive_image_source == "projector":
            if torch.is_tensor(images) and images.ndim == 4:  # one image per row: [N, T, D], no copy
                tokens = features.index_select(0, feature_index[rows])
                return pool(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device),
                            args.image_pooling)
            per_image = split_per_image(features, images)
            return torch.stack([pool(per_image[int(feature_index[r])].unsqueeze(0),
                                     torch.ones(1, per_image[int(feature_index[r])].shape[0], dtype=torch.bool,
                                                device=features.device), args.image_pooling)[0]
                                for r in rows.tolist()])
        states = select_layer(hidden_states, args.contrastive_image_layer)
        if torch.is_tensor(images) and images.ndim == 4:
            lengths = torch.full((input_ids.shape[0],), features.shape[1], device=input_ids.device)
        else:
            per_image = split_per_image(features, images)
            lengths = torch.tensor([per_image[int(i)].shape[0] for i in feature_index.tolist()],
                                   device=input_ids.device)
        mask = image_position_mask(input_ids, attention_mask, valid, lengths, states.shape[1],
                                   new_attention_mask, getattr(self.config, "tokenizer_padding_side", "right"))
        return pool(states[rows], mask[rows], args.image_pooling)


# ---- small helpers (pure functions of tensors) ------------------------------------------------
def split_per_image(features: torch.Tensor, images) -> List[torch.Tensor]:
    """Projected tokens per image, [T_i, D] each; anyres crops of one image are concatenated."""
    if isinstance(images, list) or (torch.is_tensor(images) and images.ndim == 5):
        sizes = [x.shape[0] if x.ndim == 4 else 1 for x in images]
        return [f.flatten(0, 1) for f in torch.split(features, sizes, dim=0)]
    return list(features.unbind(0))


def select_layer(hidden_states, layer: int) -> torch.Tensor:
    """hidden_states from transformers: index 0 = embeddings, -1 = last layer after the norm."""
    return hidden_states[layer]


class ContrastiveLlavaForCausalLM(ContrastiveLlavaCausalLMBody, LlavaLlamaForCausalLM):
    config_class = ContrastiveLlavaConfig


class ContrastiveLlavaMistralForCausalLM(ContrastiveLlavaCausalLMBody, LlavaMistralForCausalLM):
    config_class = ContrastiveLlavaMistralConfig


_CLASS_OF_FAMILY = {"llama": ContrastiveLlavaForCausalLM, "mistral": ContrastiveLlavaMistralForCausalLM}


def checkpoint_model_type(model_name_or_path: str) -> str:
    """model_type of a checkpoint's config (config.json read directly for a local directory)."""
    config_file = os.path.join(model_name_or_path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            return json.load(f).get("model_type", "")
    return AutoConfig.from_pretrained(model_name_or_path).model_type


def contrastive_class_for(model_name_or_path: str) -> type:
    """The contrastive class for a checkpoint: upstream's family of its model_type (ValueError otherwise)."""
    try:
        return _CLASS_OF_FAMILY[upstream_family(checkpoint_model_type(model_name_or_path))]
    except ValueError as err:
        raise ValueError(f"{model_name_or_path}: {err}") from None


class ContrastiveLlavaAutoForCausalLM:
    """Stands where upstream's train() calls ``LlavaLlamaForCausalLM.from_pretrained``: loads the
    contrastive class of the checkpoint's family."""

    @classmethod
    def from_pretrained(cls, model_name_or_path, *args, **kwargs):
        return contrastive_class_for(str(model_name_or_path)).from_pretrained(model_name_or_path, *args, **kwargs)


for _config, _model in ((ContrastiveLlavaConfig, ContrastiveLlavaForCausalLM),
                        (ContrastiveLlavaMistralConfig, ContrastiveLlavaMistralForCausalLM)):
    AutoConfig.register(_config.model_type, _config)
    AutoModelForCausalLM.register(_config, _model)

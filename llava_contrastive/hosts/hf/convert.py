"""Upstream LLaVA stage-1 projector <-> transformers' native ``LlavaForConditionalGeneration``.

Upstream (haotian-liu/LLaVA, ``mm_projector_type mlp2x_gelu``) saves ``mm_projector.bin`` with::

    model.mm_projector.0.weight / .bias    Linear(vision_hidden -> llm_hidden)
    model.mm_projector.2.weight / .bias    Linear(llm_hidden -> llm_hidden)   (index 1 is the GELU)

transformers 5.x names the same module ``model.multi_modal_projector.linear_1`` / ``linear_2``
(``LlavaForConditionalGeneration.state_dict()``; 4.x checkpoints had no leading ``model.``).
Both features are ``CLIP hidden_states[-2][:, 1:]`` -> Linear -> GELU (exact erf) -> Linear, so a
converted projector reproduces upstream's image tokens exactly.

Upstream's ``linear`` projector (``model.mm_projector.weight`` / ``.bias``, one ``nn.Linear``) is the
native class with ``projector_hidden_act="linear"`` (transformers' identity activation) and
``linear_2`` fixed to the identity: a stock ``LlavaForConditionalGeneration`` checkpoint that
``from_pretrained`` loads as it is. The plugin keeps ``linear_2`` frozen, so it trains as one linear
layer; converting back multiplies the two layers out (exact for the identity, and for any ``linear_2``).
Deeper ``mlpNx_gelu`` projectors have no native counterpart (the class has two layers): refused.

CLI::

    python -m llava_contrastive.hosts.hf.convert to-native  mm_projector.bin  projector.safetensors
    python -m llava_contrastive.hosts.hf.convert to-upstream projector.safetensors mm_projector.bin
    python -m llava_contrastive.hosts.hf.convert build --llm DIR --vision DIR --out DIR [--projector mm_projector.bin]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

UPSTREAM_PREFIX = "model.mm_projector."
NATIVE_PREFIX = "model.multi_modal_projector."  # transformers >= 4.52 / 5.x LlavaForConditionalGeneration
_UP_TO_NATIVE = {"0": "linear_1", "2": "linear_2"}
_NATIVE_TO_UP = {v: k for k, v in _UP_TO_NATIVE.items()}
_UPSTREAM_PREFIXES = ("base_model.model.model.mm_projector.", "model.mm_projector.", "mm_projector.")
# upstream --mm_projector_type -> the native config's projector_hidden_act
NATIVE_PROJECTOR_ACT = {"mlp2x_gelu": "gelu", "linear": "linear"}
IMAGE_TOKEN = "<image>"

StateDict = Dict[str, torch.Tensor]


def _strip(key: str, prefixes) -> Optional[str]:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def upstream_to_native(state: Mapping[str, torch.Tensor], prefix: str = NATIVE_PREFIX) -> StateDict:
    """``model.mm_projector.{0,2}.{weight,bias}`` (mlp2x_gelu) -> ``<prefix>linear_{1,2}.{weight,bias}``;
    ``model.mm_projector.{weight,bias}`` (linear) -> ``linear_1`` = that layer, ``linear_2`` = identity.

    Also accepts keys without ``model.`` and DeepSpeed/PEFT wrappers (``base_model.model.``).
    Tensors are passed through unchanged (no copy, no dtype change). Raises on any other key."""
    out: StateDict = {}
    forms = set()
    for key, value in state.items():
        rest = _strip(key, _UPSTREAM_PREFIXES)
        if rest is None:
            raise KeyError(f"not an upstream mm_projector key: {key!r}")
        if rest in ("weight", "bias"):  # linear: one nn.Linear
            forms.add("linear")
            out[f"{prefix}linear_1.{rest}"] = value
            continue
        index, _, param = rest.partition(".")
        if index not in _UP_TO_NATIVE or param not in ("weight", "bias"):
            raise KeyError(f"unsupported projector key {key!r}: only linear and mlp2x_gelu (indices 0 and 2) "
                           f"convert to the native LlavaMultiModalProjector (it has two layers)")
        forms.add("mlp2x_gelu")
        out[f"{prefix}{_UP_TO_NATIVE[index]}.{param}"] = value
    if len(forms) > 1:
        raise KeyError(f"projector keys {sorted(state)} mix a linear and an mlp2x_gelu projector")
    if forms == {"linear"} and f"{prefix}linear_1.weight" in out:
        out.update(identity_layer(out[f"{prefix}linear_1.weight"], f"{prefix}linear_2."))
    _check_complete(out, prefix)
    return out


def identity_layer(like: torch.Tensor, prefix: str) -> StateDict:
    """The fixed second layer of a native linear projector: weight = identity, bias = 0."""
    n = like.shape[0]
    return {f"{prefix}weight": torch.eye(n, dtype=like.dtype), f"{prefix}bias": torch.zeros(n, dtype=like.dtype)}


def upstream_projector_type(state: Mapping[str, torch.Tensor]) -> str:
    """"linear" or "mlp2x_gelu" from upstream ``mm_projector`` keys (deeper types: KeyError naming them)."""
    rests = {_strip(k, _UPSTREAM_PREFIXES) for k in state}
    if rests == {"weight", "bias"}:
        return "linear"
    if rests == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        return "mlp2x_gelu"
    raise KeyError(f"projector keys {sorted(rests, key=str)}: the native host takes linear and mlp2x_gelu projectors "
                   f"only (transformers' LlavaMultiModalProjector has two layers)")


def native_to_upstream(state: Mapping[str, torch.Tensor], prefix: str = UPSTREAM_PREFIX,
                       projector_type: str = "mlp2x_gelu") -> StateDict:
    """Inverse of :func:`upstream_to_native`. ``state`` may be a whole native state dict: keys
    outside the projector are ignored. Accepts 5.x (``model.multi_modal_projector.``) and 4.x
    (``multi_modal_projector.``) names. ``projector_type`` "linear" (config ``projector_hidden_act``
    "linear") multiplies the two layers out into upstream's one ``nn.Linear`` (in float64)."""
    out: StateDict = {}
    for key, value in state.items():
        rest = _strip(key, ("model.multi_modal_projector.", "multi_modal_projector."))
        if rest is None:
            continue
        name, _, param = rest.partition(".")
        if name not in _NATIVE_TO_UP or param not in ("weight", "bias"):
            raise KeyError(f"unsupported native projector key {key!r}")
        out[f"{prefix}{_NATIVE_TO_UP[name]}.{param}"] = value
    if not out:
        raise KeyError("no multi_modal_projector keys in the state dict")
    if projector_type == "linear":
        w1, b1, w2, b2 = (out[f"{prefix}{i}.{p}"] for i in ("0", "2") for p in ("weight", "bias"))
        dtype = w1.dtype
        w = w2.double() @ w1.double()
        b = w2.double() @ b1.double() + b2.double()
        return {f"{prefix}weight": w.to(dtype), f"{prefix}bias": b.to(dtype)}
    if projector_type != "mlp2x_gelu":
        raise ValueError(f"projector type {projector_type!r}: the native host has linear and mlp2x_gelu")
    return out


def native_projector_type(config) -> str:
    """The upstream ``mm_projector_type`` a native LLaVA config's projector computes."""
    act = getattr(config, "projector_hidden_act", "gelu")
    for name, native_act in NATIVE_PROJECTOR_ACT.items():
        if act == native_act:
            return name
    raise ValueError(f"projector_hidden_act {act!r}: no upstream projector type computes it "
                     f"(the plugin converts {sorted(NATIVE_PROJECTOR_ACT.values())})")


def freeze_fixed_projector_parts(model) -> None:
    """A native linear projector trains ``linear_1`` only: ``linear_2`` stays the identity."""
    if native_projector_type(model.config) == "linear":
        model.model.multi_modal_projector.linear_2.requires_grad_(False)


def _check_complete(state: Mapping[str, torch.Tensor], prefix: str) -> None:
    want = {f"{prefix}linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    missing = want - set(state)
    if missing:
        raise KeyError(f"projector incomplete, missing {sorted(missing)}")


def load_state(path: Union[str, Path]) -> StateDict:
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def save_state(state: Mapping[str, torch.Tensor], path: Union[str, Path]) -> None:
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)


# ---- building a native checkpoint -------------------------------------------------------------
def build_processor(llm_dir, vision_dir, patch_size: int, image_seq_length: int, chat_template=None,
                    class_token: bool = True):
    """LlavaProcessor = the tower's image processor + the LLM tokenizer with ``<image>`` added.
    ``class_token``: the tower prepends one (CLIP: dropped, "default"); SigLIP has none ("full")."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))  # never LlamaTokenizer(vocab_file=...)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    image_processor = AutoImageProcessor.from_pretrained(str(vision_dir))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy=feature_strategy(class_token),
                          num_additional_image_tokens=int(class_token), image_token=IMAGE_TOKEN,
                          chat_template=chat_template)


def feature_strategy(class_token: bool) -> str:
    """transformers' ``vision_feature_select_strategy``: "default" drops the class token, "full" keeps all."""
    return "default" if class_token else "full"


def vision_tower_config(vision_dir):
    """(vision config, tower class, whether it has a class token) of a CLIP or SigLIP tower directory
    (a vision-only checkpoint or a full CLIP / SigLIP one, whose vision half is taken)."""
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    config = AutoConfig.from_pretrained(str(vision_dir))
    kind = getattr(config, "model_type", "")
    if kind in ("clip", "siglip"):
        config = config.vision_config
        kind = config.model_type
    if kind == "clip_vision_model":
        return config, CLIPVisionModel, True
    if kind == "siglip_vision_model":
        return config, SiglipVisionModel, False
    raise ValueError(f"{vision_dir}: vision tower of type {kind!r}; the native host builds CLIP and SigLIP towers")


PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}"
)


def build_native_llava(llm_dir, vision_dir, out_dir=None, projector=None, vision_feature_layer: int = -2,
                       dtype: torch.dtype = torch.float32, model_class=None, seed: int = 0,
                       projector_type: Optional[str] = None):
    """Assemble ``LlavaForConditionalGeneration`` from a causal LM (Llama, Mistral, Qwen2, ...: any text
    model the native class accepts) and a CLIP or SigLIP vision tower (SigLIP: no class token, so every
    token is a patch, ``vision_feature_select_strategy="full"``).

    ``projector``: None (fresh init, from ``seed``, with ``nn.Linear``'s default init as upstream's
    ``build_vision_projector`` gets, not transformers' normal(0, 0.02)), a path to
    ``mm_projector.bin`` / safetensors, or an upstream or native projector state dict. ``projector_type``
    (upstream's ``--mm_projector_type``): "mlp2x_gelu" or "linear"; default: that of an upstream
    ``projector``, else mlp2x_gelu. Returns (model, processor); with ``out_dir`` both are saved
    (``save_pretrained``) so ``from_pretrained`` + ``AutoProcessor.from_pretrained`` load them offline.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    model_class = model_class or LlavaForConditionalGeneration
    if projector is not None:
        projector = load_state(projector) if isinstance(projector, (str, Path)) else dict(projector)
        if projector_type is None and _is_upstream(projector):
            projector_type = upstream_projector_type(projector)
    projector_type = projector_type or "mlp2x_gelu"
    if projector_type not in NATIVE_PROJECTOR_ACT:
        from llava_contrastive.training.preflight import native_projector_refusal

        raise ValueError(native_projector_refusal(projector_type))
    text_config = AutoConfig.from_pretrained(str(llm_dir))
    vision_config, tower_class, class_token = vision_tower_config(vision_dir)
    patch, size = vision_config.patch_size, vision_config.image_size
    seq = (size // patch) ** 2  # patch tokens: CLIP's class token is dropped, SigLIP has none
    processor = build_processor(llm_dir, vision_dir, patch, seq, chat_template=PLAIN_CHAT_TEMPLATE,
                                class_token=class_token)
    if getattr(processor.tokenizer, "chat_template", None):
        # an LLM with a chat template of its own (Qwen2's ChatML, ...) keeps it: the processor gets no
        # separate one, which save_pretrained would write over the tokenizer's
        processor.chat_template = None
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = max(len(tokenizer), text_config.vocab_size)

    config = LlavaConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                         image_token_index=image_token_id, image_seq_length=seq,
                         projector_hidden_act=NATIVE_PROJECTOR_ACT[projector_type],
                         vision_feature_select_strategy=feature_strategy(class_token),
                         vision_feature_layer=vision_feature_layer, multimodal_projector_bias=True,
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    config.text_config.vocab_size = text_config.vocab_size
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = model_class(config)

    llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32)
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    tower = tower_class.from_pretrained(str(vision_dir), dtype=torch.float32)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    del llm, tower
    if vocab > config.text_config.vocab_size:
        # The <image> row of the input embeddings is always overwritten by projector features;
        # its lm_head row is the mean of the others (transformers' mean resizing).
        model.resize_token_embeddings(vocab, mean_resizing=True)
    if projector is not None:
        load_projector(model, projector)
    else:
        init_projector_like_upstream(model, seed)
    model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        processor.save_pretrained(str(out_dir))
    return model, processor


def init_projector_like_upstream(model, seed: int) -> None:
    """Re-initialise the projector's linear layers as upstream's stage 1 starts them (``nn.Linear``
    defaults: kaiming-uniform weights, uniform biases), from ``seed``."""
    module = model.model.multi_modal_projector
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in (module.linear_1, module.linear_2):
            layer.reset_parameters()
    if native_projector_type(model.config) == "linear":
        with torch.no_grad():
            for name, value in identity_layer(module.linear_2.weight, "").items():
                getattr(module.linear_2, name).copy_(value)


def load_projector(model, projector) -> None:
    """Load an upstream or native projector (path or state dict) into a native model, strictly."""
    state = load_state(projector) if isinstance(projector, (str, Path)) else dict(projector)
    if _is_upstream(state):
        kind, want = upstream_projector_type(state), native_projector_type(model.config)
        if kind != want:
            raise ValueError(f"a {kind} projector does not load into a native model built with --mm_projector_type "
                             f"{want}. Fix: build it with --mm_projector_type {kind}.")
        state = upstream_to_native(state)
    state = {(_strip(k, ("model.multi_modal_projector.", "multi_modal_projector.")) or k): v for k, v in state.items()}
    module = model.model.multi_modal_projector
    ref = next(module.parameters())
    module.load_state_dict({k: v.to(ref.dtype) for k, v in state.items()}, strict=True)


def projector_state(model, upstream: bool = True) -> StateDict:
    """The native model's projector as an upstream (``mm_projector.bin``) or native state dict."""
    state = {NATIVE_PREFIX + k: v.detach().cpu() for k, v in model.model.multi_modal_projector.state_dict().items()}
    return native_to_upstream(state, projector_type=native_projector_type(model.config)) if upstream else state


def _is_upstream(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(_UPSTREAM_PREFIXES) for k in state)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_contrastive.hosts.hf.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-native", help="mm_projector.bin -> native projector keys")
    a.add_argument("src"); a.add_argument("dst")
    b = sub.add_parser("to-upstream", help="native projector (or whole native checkpoint file) -> mm_projector.bin")
    b.add_argument("src"); b.add_argument("dst")
    b.add_argument("--projector_type", choices=sorted(NATIVE_PROJECTOR_ACT), default=None,
                   help="default: from the checkpoint directory's config.json, else mlp2x_gelu")
    c = sub.add_parser("build", help="assemble a native LlavaForConditionalGeneration checkpoint + processor")
    c.add_argument("--llm", required=True); c.add_argument("--vision", required=True)
    c.add_argument("--out", required=True); c.add_argument("--projector", default=None)
    c.add_argument("--vision_feature_layer", type=int, default=-2)
    c.add_argument("--seed", type=int, default=0, help="fresh projector init (without --projector)")
    c.add_argument("--mm_projector_type", choices=sorted(NATIVE_PROJECTOR_ACT), default=None,
                   help="default: that of --projector, else mlp2x_gelu")
    args = parser.parse_args(argv)
    if args.cmd == "to-native":
        save_state(upstream_to_native(load_state(args.src)), args.dst)
    elif args.cmd == "to-upstream":
        src = Path(args.src)
        kind = args.projector_type
        if src.is_dir():
            from safetensors.torch import load_file
            from transformers import AutoConfig
            state = {}
            for f in sorted(src.glob("*.safetensors")):
                state.update(load_file(str(f)))
            kind = kind or native_projector_type(AutoConfig.from_pretrained(str(src)))
        else:
            state = load_state(src)
        save_state(native_to_upstream(state, projector_type=kind or "mlp2x_gelu"), args.dst)
    else:
        build_native_llava(args.llm, args.vision, args.out, projector=args.projector,
                           vision_feature_layer=args.vision_feature_layer, seed=args.seed,
                           projector_type=args.mm_projector_type)
    print(f"wrote {getattr(args, 'dst', None) or args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

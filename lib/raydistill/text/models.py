"""BERT-family models for text classification and extractive question answering: the teacher
from a Hugging Face folder (or hub id), a smaller student configuration, DistilBERT-style initialisation from the teacher's
layers, and safetensors files that carry their own model configuration.

Models run with eager attention, so that attention probabilities can be read for TinyBERT's
attention loss and the ONNX export traces plain ops.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

HF_PREFIX = "hf:"
QA = "question_answering"


def auto_class(task: str):
    """The transformers Auto class of a text task's models."""
    import transformers

    return (transformers.AutoModelForQuestionAnswering if task == QA
            else transformers.AutoModelForSequenceClassification)


def is_qa_model(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForQuestionAnswering")


def logits_of_output(out) -> torch.Tensor:
    """A model output's logits: (B, classes), or for QA start and end logits stacked (B, L, 2)."""
    if getattr(out, "start_logits", None) is not None:
        return torch.stack((out.start_logits, out.end_logits), dim=-1)
    return out.logits


class ModelError(ValueError):
    """A teacher folder, tokenizer or weights file that is missing or does not fit."""


def hf_source(arch: str) -> str:
    """`hf:<folder or hub id>` -> the folder (a local path when one exists) or the hub id."""
    name = arch[len(HF_PREFIX):]
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def teacher_config(arch: str):
    """The teacher's transformers config, offline only: a local folder, or a hub id already in
    the Hugging Face cache."""
    from transformers import AutoConfig

    source = hf_source(arch)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        if Path(source).exists():
            raise ModelError(f"teacher.arch {arch}: no model config in folder {source} "
                             f"({str(err).splitlines()[0][:160]})") from None
        raise ModelError(f"teacher.arch {arch}: no folder {Path(source).resolve()}, and no such model in the "
                         "local Hugging Face cache (nothing is downloaded: put it in the cache first)") from None


def _eager(config, num_labels: int, vocab_size: int | None = None):
    tree = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    config = config.__class__.from_dict({**tree, "num_labels": num_labels,
                                         **({"vocab_size": vocab_size} if vocab_size else {})})
    config._attn_implementation = "eager"
    return config


def build_teacher(arch: str, num_labels: int, vocab_size: int, pretrained: bool, seed: int,
                  task: str = "text_classification") -> nn.Module:
    """The teacher: the folder's weights with a fresh task head (pretrained), or its
    configuration randomly initialised with the tokenizer's vocabulary."""
    auto = auto_class(task)
    num_labels = 2 if task == QA else num_labels  # a QA head scores each token as start and end
    config = teacher_config(arch)
    torch.manual_seed(seed)  # identical init on every rank before ZeRO partitions it
    if not pretrained:
        return auto.from_config(_eager(config, num_labels, vocab_size))
    if vocab_size > config.vocab_size:
        raise ModelError(f"teacher.arch {arch}: its embeddings hold {config.vocab_size} tokens but the tokenizer "
                         f"has {vocab_size}; use the model's own tokenizer (data.tokenizer)")
    try:
        return auto.from_pretrained(
            hf_source(arch), config=_eager(config, num_labels), local_files_only=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"teacher.arch {arch}: no loadable weights ({str(err).splitlines()[0][:160]}); "
                         "set teacher.pretrained=false to train its configuration from scratch") from None


def student_config(teacher_cfg, layers: int, hidden: int, heads: int):
    """The teacher's configuration, narrowed: `layers` layers of width `hidden` with `heads`
    heads and a feed-forward 4x as wide (BERT's ratio)."""
    if hidden % heads:
        raise ModelError(f"student.hidden {hidden} must divide by student.heads {heads}")
    cfg = teacher_cfg.__class__.from_dict({**teacher_cfg.to_dict(), "num_hidden_layers": layers,
                                           "hidden_size": hidden, "num_attention_heads": heads,
                                           "intermediate_size": 4 * hidden})
    cfg._attn_implementation = "eager"
    return cfg


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer each student layer starts from / learns from: every k-th, ending at the top."""
    k = teacher_layers / student_layers
    return [round(k * (i + 1)) - 1 for i in range(student_layers)]


def can_copy_layers(teacher_cfg, student_cfg) -> bool:
    return (teacher_cfg.hidden_size == student_cfg.hidden_size
            and teacher_cfg.num_attention_heads == student_cfg.num_attention_heads
            and teacher_cfg.intermediate_size == student_cfg.intermediate_size
            and student_cfg.num_hidden_layers <= teacher_cfg.num_hidden_layers)


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[int]:
    """DistilBERT's initialisation: embeddings, pooler and head copied, and student layer i
    from teacher layer layer_map[i]. Returns the map."""
    s_cfg, t_cfg = student.config, teacher.config
    mapping = layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    state = teacher.state_dict()
    layer_key = ".encoder.layer."
    copied = {}
    for name in student.state_dict():
        if layer_key in name:
            head, rest = name.split(layer_key, 1)
            index, tail = rest.split(".", 1)
            copied[name] = state[f"{head}{layer_key}{mapping[int(index)]}.{tail}"]
        elif name in state:
            copied[name] = state[name]
    student.load_state_dict(copied, strict=False)
    return mapping


class TextLogits(nn.Module):
    """(input_ids, attention_mask, token_type_ids) -> logits (logits_of_output): what is
    trained, exported and served."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return logits_of_output(self.model(input_ids=input_ids, attention_mask=attention_mask,
                                           token_type_ids=token_type_ids))


def model_meta(model: nn.Module, role: str, data) -> dict[str, str]:
    """The safetensors header of a text model: its configuration and what serving needs."""
    meta = {"task": data.task, "role": role, "hf_config": json.dumps(model.config.to_dict()),
            "class_names": json.dumps(data.class_names), "max_length": str(data.max_length),
            "has_pair": "true" if data.has_pair else "false"}
    if data.task == QA:
        meta.update(doc_stride=str(data.doc_stride), max_answer_tokens=str(data.max_answer_tokens),
                    allow_no_answer="true" if data.allow_no_answer else "false")
    return meta


def model_from_meta(meta: dict[str, str]) -> nn.Module:
    """An empty model of the configuration a weights file's header holds."""
    from transformers import AutoConfig

    if meta.get("task") not in ("text_classification", QA) or "hf_config" not in meta:
        raise ModelError("the weights file holds no text model configuration (an image model's file?)")
    config_dict = json.loads(meta["hf_config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    config._attn_implementation = "eager"
    return auto_class(meta["task"]).from_config(config)


def load_model(path: Path, sha256: str | None = None) -> nn.Module:
    from raydistill.artifacts import load_weights

    state, meta = load_weights(Path(path), sha256)
    model = model_from_meta(meta)
    model.load_state_dict(state, strict=False)  # tied or absent position_ids buffers aside
    return model.eval()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

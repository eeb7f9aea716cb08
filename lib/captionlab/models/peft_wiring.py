"""PEFT wiring for the GPT decoder: LoRA through HF peft, adapters / prefix tuning through the decoder's own
fields, freezing, and the trainable-parameter report with its budget check."""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from captionlab.errors import BudgetError, ConfigError

PEFT_METHODS = ("lora", "adapter", "prefix", "none")
DEFAULT_LORA_TARGETS = ["c_attn"]


def freeze(module: nn.Module) -> nn.Module:
    """Set requires_grad=False on every parameter of `module` (returned for chaining)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_LORA_TARGETS) -> nn.Module:
    """Inject LoRA layers (HF peft) into the modules named `targets`, in place; only LoRA weights stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(targets)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"lora_targets {missing} match no module of the decoder (e.g. c_attn, c_proj, c_fc)")
    if rank <= 0:
        raise ConfigError(f"lora_rank must be positive, got {rank}")
    freeze(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def unfreeze_matching(model: nn.Module, substrings: Iterable[str]) -> int:
    """Make parameters whose name contains any of `substrings` trainable; return how many tensors matched."""
    subs = tuple(substrings)
    n = 0
    for name, p in model.named_parameters():
        if any(s in name for s in subs):
            p.requires_grad_(True)
            n += 1
    return n


def wire_decoder(gpt: nn.Module, method: str, lora_rank: int = 8, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.0, lora_targets: Iterable[str] = DEFAULT_LORA_TARGETS) -> nn.Module:
    """Freeze the decoder and make only the PEFT weights of `method` trainable (lora | adapter | prefix | none).

    Adapters and prefix tuning must already be built into the decoder (GPTConfig.adapter_dim / prefix_len).
    """
    if method not in PEFT_METHODS:
        raise ConfigError(f"peft must be one of {PEFT_METHODS}, got {method!r}")
    if method == "lora":
        return apply_lora(gpt, lora_rank, lora_alpha, lora_dropout, lora_targets)
    freeze(gpt)
    if method == "adapter" and unfreeze_matching(gpt, ["adapter_attn.", "adapter_mlp."]) == 0:
        raise ConfigError("peft=adapter but the decoder has no adapters (adapter_dim must be > 0)")
    if method == "prefix" and unfreeze_matching(gpt, ["prefix_kv"]) == 0:
        raise ConfigError("peft=prefix but the decoder has no prefix (prefix_len must be > 0)")
    return gpt


def count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of `module`, shared tensors counted once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_report(groups: dict[str, nn.Module]) -> dict:
    """Totals and per-group counts: {"total", "trainable", "share", "groups": {name: {"total", "trainable"}}}."""
    per = {name: {"total": count(m), "trainable": count(m, True)} for name, m in groups.items()}
    total = sum(g["total"] for g in per.values())
    trainable = sum(g["trainable"] for g in per.values())
    return {"total": total, "trainable": trainable, "share": trainable / max(total, 1), "groups": per}


def format_report(report: dict) -> str:
    """The parameter report as a small aligned table."""
    lines = [f"{'group':<12}{'total':>14}{'trainable':>14}"]
    for name, g in report["groups"].items():
        lines.append(f"{name:<12}{g['total']:>14,}{g['trainable']:>14,}")
    lines.append(f"{'all':<12}{report['total']:>14,}{report['trainable']:>14,}  "
                 f"({100 * report['share']:.2f}% trainable)")
    return "\n".join(lines)


def check_budget(report: dict, budget: int | None) -> None:
    """Raise BudgetError when the trainable parameters exceed `budget` (None or <= 0: no budget)."""
    if budget and budget > 0 and report["trainable"] > budget:
        per = ", ".join(f"{k}={v['trainable']:,}" for k, v in report["groups"].items())
        raise BudgetError(f"captioner has {report['trainable']:,} trainable parameters, over the budget of "
                          f"{budget:,} ({per}); lower lora_rank / adapter_dim / prefix_len or the projector size")

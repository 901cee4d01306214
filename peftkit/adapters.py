"""Adapter injection through peft, one registry entry per method, and the trainable-parameter report.

A new method is one :data:`METHODS` entry: a function that turns the adapter settings and the
resolved target modules into a peft config (or ``None`` for methods that train the plain model),
whether peft can merge it, and an optional per-step hook (AdaLoRA reallocates ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    get_peft_model,
)
from torch import nn

from peftkit.errors import UserError
from peftkit.models import Architecture, default_targets, head_modules, linear_module_names, matches_suffix


@dataclass(frozen=True)
class AdapterSpec:
    """The settings of one adapter, flat (the ``adapter:`` section plus what the run knows)."""

    method: str
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str | list[str] = "auto"
    modules_to_save: str | list[str] = "auto"
    init_r: int = 12
    target_r: int = 4
    total_steps: int = 1000

    @classmethod
    def from_section(cls, adapter: Any, total_steps: int = 1000) -> AdapterSpec:
        """From the config's ``adapter:`` section plus the run's optimizer steps (AdaLoRA's schedule)."""
        return cls(method=adapter.method, r=adapter.r, alpha=adapter.alpha, dropout=adapter.dropout,
                   target_modules=adapter.target_modules, modules_to_save=adapter.modules_to_save,
                   init_r=adapter.init_r, target_r=adapter.target_r, total_steps=total_steps)


@dataclass(frozen=True)
class Targets:
    modules: list[str]
    feedforward: list[str]
    to_save: list[str]


@dataclass(frozen=True)
class Method:
    """One adapter method: how to build its peft config, and what it supports."""

    build: Callable[[AdapterSpec, Targets], PeftConfig] | None
    mergeable: bool = True
    uses_ia3_targets: bool = False
    after_backward: Callable[[nn.Module, int], None] | None = None


def _lora(**extra: Any) -> Callable[[AdapterSpec, Targets], PeftConfig]:
    def build(spec: AdapterSpec, t: Targets) -> PeftConfig:
        return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                          target_modules=t.modules, modules_to_save=t.to_save, **extra)
    return build


def _ia3(spec: AdapterSpec, t: Targets) -> PeftConfig:
    return IA3Config(target_modules=t.modules, feedforward_modules=t.feedforward, modules_to_save=t.to_save)


def _loha(spec: AdapterSpec, t: Targets) -> PeftConfig:
    return LoHaConfig(r=spec.r, alpha=spec.alpha, module_dropout=spec.dropout, target_modules=t.modules, modules_to_save=t.to_save)


def _lokr(spec: AdapterSpec, t: Targets) -> PeftConfig:
    return LoKrConfig(r=spec.r, alpha=spec.alpha, module_dropout=spec.dropout, target_modules=t.modules, modules_to_save=t.to_save)


def _adalora(spec: AdapterSpec, t: Targets) -> PeftConfig:
    # AdaLoRA needs a budgeting phase: warm up on the first 10% and freeze ranks for the last 10%.
    total = max(spec.total_steps, 3)
    return AdaLoraConfig(init_r=spec.init_r, target_r=spec.target_r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                         target_modules=t.modules, modules_to_save=t.to_save, total_step=total,
                         tinit=total // 10, tfinal=total // 10)


def _adalora_step(model: nn.Module, step: int) -> None:
    model.base_model.update_and_allocate(step)


METHODS: dict[str, Method] = {
    "lora": Method(_lora()),
    "dora": Method(_lora(use_dora=True)),
    "rslora": Method(_lora(use_rslora=True)),
    "ia3": Method(_ia3, uses_ia3_targets=True),
    "loha": Method(_loha),
    "lokr": Method(_lokr),
    "adalora": Method(_adalora, after_backward=_adalora_step),
    "full": Method(None, mergeable=False),  # nothing to merge: the whole model is the result
    "freeze": Method(None, mergeable=False),  # linear probe: only the head trains
}


def _module_summary(model: nn.Module) -> str:
    names = linear_module_names(model)
    suffixes = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1] == "dense" else n.split(".")[-1] for n in names})
    return ", ".join(suffixes)


def resolve_targets(model: nn.Module, arch: Architecture, spec: AdapterSpec) -> Targets:
    """The full module names to adapt and to save, checked against the model."""
    method = METHODS[spec.method]
    to_save = _resolve_to_save(model, arch, spec.modules_to_save)
    if method.build is None:
        return Targets([], [], to_save)
    if spec.target_modules == "auto":
        suffixes = arch.ia3_targets if method.uses_ia3_targets else arch.lora_targets
        modules = default_targets(model, arch, suffixes)
    elif spec.target_modules == "all-linear":
        modules = default_targets(model, arch, ())
    else:
        missing = [t for t in spec.target_modules if not any(matches_suffix(n, [t]) for n in linear_module_names(model))]
        if missing:
            raise UserError(
                f"`adapter.target_modules` entries {missing} match no linear layer of this model. "
                f"Its linear layers end with: {_module_summary(model)}. Use those names, `auto` or `all-linear`."
            )
        modules = [n for n in linear_module_names(model) if matches_suffix(n, spec.target_modules) and n not in to_save
                   and not any(n.startswith(s + ".") for s in to_save)]
    if not modules:
        raise UserError(
            f"`adapter.target_modules: {spec.target_modules}` selects no linear layer inside the encoder. "
            f"The model's linear layers end with: {_module_summary(model)}."
        )
    feedforward = [m for m in modules if matches_suffix(m, arch.ia3_feedforward)] if method.uses_ia3_targets else []
    return Targets(modules, feedforward, to_save)


def _resolve_to_save(model: nn.Module, arch: Architecture, wanted: str | list[str]) -> list[str]:
    if wanted == "auto":
        found = head_modules(model, arch)
        if not found:
            raise UserError(f"No task head found (looked for {list(arch.head)}); set `adapter.modules_to_save` to the head's module name.")
        return found
    names = {n for n, _ in model.named_modules()}
    missing = [w for w in wanted if w not in names and not any(n.endswith("." + w) for n in names)]
    if missing:
        raise UserError(f"`adapter.modules_to_save` entries {missing} are not modules of this model; top-level modules: {sorted(n for n in names if n and '.' not in n)}.")
    return list(wanted)


def inject(model: nn.Module, arch: Architecture, spec: AdapterSpec) -> tuple[nn.Module, Targets]:
    """Wrap ``model`` with the adapter of ``spec.method`` and set what trains.

    ``full`` trains every parameter; ``freeze`` trains only the head (and DeBERTa's pooler).
    """
    method = METHODS[spec.method]
    targets = resolve_targets(model, arch, spec)
    if method.build is None:
        for name, param in model.named_parameters():
            param.requires_grad = spec.method == "full" or any(name.startswith(h + ".") for h in targets.to_save)
        return model, targets
    return get_peft_model(model, method.build(spec, targets)), targets


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as the parameters they stand for, not their bytes."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 leaves an empty local shard
        if type(param).__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total

"""A hand-written LoRA layer with an on/off switch and named adapters.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a linear map W0 (out, in) and learns a low-rank update:

    h = W0 x + (alpha / r) * B A x          A: (r, in)  B: (out, r)  r << min(in, out)

A starts Kaiming-uniform and B at zero, so a new adapter changes nothing. Hydra-RLHF needs two more things:
- an enable flag: with LoRA off the layer is exactly W0 x, so one frozen trunk doubles as the reference policy
  and the reward model ("dynamic LoRA", Santacroce et al. 2023, section 3);
- several named adapters on one layer (Hydra-PPO: "actor" and "critic"), one active at a time.

Where: by default on every linear map inside the decoder layers (the paper: "LoRA on the decoder layers' linear
maps"; peft calls it "all-linear"), found by structure rather than by name, so any family works: the layer stack is
the model's largest nn.ModuleList, and the LM head and embeddings lie outside it.

Public API: LoRALinear, add_lora, decoder_layers, describe_lora, lora_off, use_adapter, folded, lora_parameters,
lora_state_dict, load_lora_state_dict, merge_lora. Learned from microsoft/LoRA (loralib/layers.py) and cccntu/minLoRA.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # GPT-2's linear maps are transformers' Conv1D: y = x W + b with W stored (in, out), nn.Linear's transposed
    from transformers.pytorch_utils import Conv1D
    LINEAR_TYPES = (nn.Linear, Conv1D)
except ImportError:  # without transformers lora.py needs only torch
    LINEAR_TYPES = (nn.Linear,)

# add_lora's default targets: every linear map inside the decoder layers (peft's name for the same rule).
DEFAULT_TARGETS = "all-linear"


class LoRALinear(nn.Module):
    """y = base(x) + scaling * dropout(x) @ A.T @ B.T when enabled, else exactly base(x).
    base: an nn.Linear, or a Conv1D (GPT-2), the same linear map with its weight stored transposed."""

    def __init__(self, base: nn.Module, r=8, alpha=16.0, dropout=0.0, adapter="default"):
        super().__init__()
        assert isinstance(base, LINEAR_TYPES), f"LoRALinear wraps nn.Linear or Conv1D, got {type(base).__name__}"
        assert r > 0, f"LoRA rank r must be positive, got {r}"
        self.base = base.requires_grad_(False)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D: weight (in, out); peft's name for it
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()  # name -> (r, in_features)
        self.lora_B = nn.ParameterDict()  # name -> (out_features, r)
        self.enabled = True               # the switch: False gives back the frozen base layer bit for bit
        self.active = adapter             # which adapter runs when enabled
        self.folded = None                # only inside folded(): (adapter, W0 + (alpha/r) B A) for fast inference
        self.add_adapter(adapter)

    def W0(self):
        """The frozen weight as (out, in) whichever way the base stores it; a view, so writes reach the base."""
        return self.base.weight.T if self.fan_in_fan_out else self.base.weight

    def add_adapter(self, name):
        assert name not in self.lora_A, f"adapter {name!r} already exists"
        # Adapters are fp32 parameters even on a bf16 trunk (as in peft), so AdamW updates them in full precision.
        out_features, in_features = self.W0().shape
        A = torch.empty(self.r, in_features, device=self.base.weight.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as nn.Linear and microsoft/LoRA
        B = torch.zeros(out_features, self.r, device=self.base.weight.device)
        self.lora_A[name], self.lora_B[name] = nn.Parameter(A), nn.Parameter(B)

    def forward(self, x):
        if self.enabled and self.folded is not None and self.folded[0] == self.active:  # inside folded()
            return F.linear(x, self.folded[1], self.base.bias)  # (W0 + (alpha/r) B A) x: one matmul
        y = self.base(x)  # W0 x
        if not self.enabled:
            return y
        A, B = self.lora_A[self.active], self.lora_B[self.active]
        return y + (self.scaling * (self.dropout(x).to(A.dtype) @ A.T @ B.T)).to(y.dtype)  # + (alpha/r) B A x

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, adapters={list(self.lora_A)}, active={self.active!r}"


def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def decoder_layers(model) -> nn.ModuleList:
    """The stack of decoder layers: the nn.ModuleList holding the most parameters (model.layers in Llama,
    model.decoder.layers in OPT, transformer.h in GPT-2 and Falcon, gpt_neox.layers in GPT-NeoX, ...)."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no stack of layers (nn.ModuleList) to put LoRA in")
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))


def add_lora(model, targets=DEFAULT_TARGETS, r=8, alpha=16.0, dropout=0.0, adapter="default") -> int:
    """Wrap every linear map inside the decoder layers, or only those whose name ends with one of `targets` (or add
    adapter `adapter` to an existing LoRALinear). Afterwards only LoRA parameters are trainable in `model`.
    Returns how many layers it touched."""
    inside = set(decoder_layers(model).modules())  # never the LM head, the embeddings, or heads outside the stack
    touched = 0
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if module not in inside or isinstance(model.get_submodule(parent_name), LoRALinear):  # or LoRALinear.base
            continue
        if targets != DEFAULT_TARGETS and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, LoRALinear):
            if (module.r, module.alpha) != (r, alpha):
                raise ValueError(f"{name}: adapters on one layer share r and alpha; it has r={module.r}, "
                                 f"alpha={module.alpha}, asked r={r}, alpha={alpha}")
            module.add_adapter(adapter)
        elif isinstance(module, LINEAR_TYPES):
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, r, alpha, dropout, adapter))
        else:
            continue
        touched += 1
    if touched == 0:
        raise ValueError(f"add_lora found no linear map named like {targets} in the decoder layers")
    model.requires_grad_(False)  # like peft's get_peft_model: only LoRA trains; the caller unfreezes heads
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return touched


def describe_lora(model) -> str:
    """One line for a run's log: which linear maps of a decoder layer carry LoRA, and how many LoRA parameters."""
    stack, layers = decoder_layers(model), _lora_layers(model)
    names = list(dict.fromkeys(n.split(".", 1)[1] for n, m in stack.named_modules() if isinstance(m, LoRALinear)))
    n = sum(p.numel() for p in lora_parameters(model))
    return (f"LoRA r {layers[0].r} on {len(names)} linear maps in each of {len(stack)} decoder layers "
            f"({', '.join(names)}), adapters {', '.join(layers[0].lora_A)}: {n:,} parameters")


@contextmanager
def lora_off(model):
    """Inside: every LoRALinear computes exactly its frozen base layer. The previous switches come back on exit."""
    layers = _lora_layers(model)
    before = [m.enabled for m in layers]
    try:
        for m in layers:
            m.enabled = False
        yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


@contextmanager
def use_adapter(model, name):
    """Inside: adapter `name` is the active one in every LoRALinear (and LoRA is on). Restores on exit."""
    layers = _lora_layers(model)
    missing = [m for m in layers if name not in m.lora_A]
    if not layers or missing:
        raise KeyError(f"adapter {name!r} is not on every LoRA layer of this model")
    before = [(m.active, m.enabled) for m in layers]
    try:
        for m in layers:
            m.active, m.enabled = name, True
        yield model
    finally:
        for m, (a, e) in zip(layers, before):
            m.active, m.enabled = a, e


@contextmanager
def folded(model, name):
    """Inside: every LoRALinear computes y = (W0 + (alpha/r) B A) x with adapter `name` folded into one matrix: one
    matmul per layer instead of three, for sampling token by token. W0 itself is untouched (LoRA off stays exact);
    the price is a copy of every adapted weight while inside. Inference only: no gradient reaches A or B."""
    layers = _lora_layers(model)
    if not layers or any(name not in m.lora_A for m in layers):
        raise KeyError(f"adapter {name!r} is not on every LoRA layer of this model")
    before = [m.folded for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                W = m.W0()  # W0 + scaling * B @ A, computed in fp32: (out, in) for F.linear, also for a Conv1D
                m.folded = name, torch.addmm(W.float(), m.lora_B[name].float(), m.lora_A[name].float(),
                                             alpha=m.scaling).to(W.dtype)
        yield model
    finally:
        for m, f in zip(layers, before):
            m.folded = f


def lora_parameters(model, adapter=None):
    """The LoRA parameters (A and B) of one adapter, or of all adapters when adapter is None."""
    return [p for m in _lora_layers(model) for d in (m.lora_A, m.lora_B)
            for name, p in d.items() if adapter is None or name == adapter]


def lora_state_dict(model, adapter=None):
    """{parameter name: tensor} of the LoRA weights only, e.g. '...q_proj.lora_A.actor'."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if (".lora_A." in k or ".lora_B." in k) and (adapter is None or k.endswith("." + adapter))}


def load_lora_state_dict(model, state_dict):
    """Load what lora_state_dict saved into a model that already has the same adapters (add_lora first)."""
    own = model.state_dict()
    unknown = [k for k in state_dict if k not in own]
    if unknown:
        raise KeyError(f"{len(unknown)} LoRA weights have no place in this model (add_lora first?), e.g. {unknown[0]}")
    model.load_state_dict(state_dict, strict=False)


@torch.no_grad()
def merge_lora(model, adapter):
    """Fold W0 += scaling * B A of `adapter` into every LoRALinear and put the plain nn.Linear back (other
    adapters are dropped). For export: the result is an ordinary transformers model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            W = module.W0()  # (out, in)
            delta = module.scaling * (module.lora_B[adapter].float() @ module.lora_A[adapter].float())  # (out, in)
            W.copy_((W.float() + delta).to(W.dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)
    return model

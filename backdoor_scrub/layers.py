"""Naming, describing and auto-selecting the layers of a model from one dry-run forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# The automatically chosen stage holds at least this share of the feature extractor's weights.
STAGE_PARAM_FRACTION = 0.5


@dataclass(frozen=True)
class LayerInfo:
    """One module seen during the dry run, in the order its forward finished (shape without batch)."""

    name: str
    type: str
    output_shape: list[int] | None
    parameters: int
    editable: bool
    auto_selected: bool = False


@dataclass(frozen=True)
class _Trace:
    name: str
    module: nn.Module
    output_shape: list[int] | None
    single_tensor: bool
    takes_network_input: bool
    input_id: int | None  # identities of the dry run's tensors: which module's output fed which module
    output_id: int | None


def describe_layers(model: nn.Module, input_size: tuple[int, int, int]) -> list[LayerInfo]:
    """Every module that ran in a dry-run forward pass, with the automatic edit choice marked."""
    traces = trace_modules(model, input_size)
    selected = set(select_layers(model, traces, input_size))
    return [
        LayerInfo(
            name=t.name,
            type=type(t.module).__name__,
            output_shape=t.output_shape,
            parameters=count_parameters(t.module),
            editable=is_editable(t),
            auto_selected=t.name in selected,
        )
        for t in traces
    ]


def auto_select_layers(model: nn.Module, input_size: tuple[int, int, int]) -> list[str]:
    """The layers `edit` changes by default: the last stage of the feature extractor, then the head."""
    return select_layers(model, trace_modules(model, input_size), input_size)


def trace_modules(model: nn.Module, input_size: tuple[int, int, int]) -> list[_Trace]:
    """Run one forward pass on a blank input and record each module as its forward finishes."""
    traces: list[_Trace] = []
    alive: list[object] = []  # keeps every traced tensor, so that no two share an identity
    network_input = torch.zeros(1, *input_size, device=_device_of(model))

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            single = len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)
            shape = list(output.shape[1:]) if isinstance(output, torch.Tensor) else None
            alive.extend((args, output))
            traces.append(_Trace(name, module, shape, single, len(args) == 1 and args[0] is network_input,
                                 id(args[0]) if single else None, id(output) if single else None))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        with torch.inference_mode():
            model.eval()(network_input)
    finally:
        for handle in handles:
            handle.remove()
    return _first_calls(traces)


def select_layers(model: nn.Module, traces: list[_Trace], input_size: tuple[int, int, int]) -> list[str]:
    """Names of the automatically selected stage modules, then the linear layers of the head."""
    head = _find_head(traces)
    stage = _find_stage(model, traces, head, input_size)
    return stage + _linear_chain(model, traces, stage, head)


def is_editable(trace: _Trace) -> bool:
    """A module with weights that maps one tensor to one tensor can be re-run and edited alone."""
    return trace.single_tensor and count_parameters(trace.module) > 0


def count_parameters(module: nn.Module) -> int:
    """Number of parameters in a module and its children."""
    return sum(p.numel() for p in module.parameters())


def is_linear_map(module: nn.Module) -> bool:
    """A Linear layer, or a 1x1 Conv2d that acts as one at every position."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        and module.stride == (1, 1) and module.padding in ((0, 0), "valid")
    )


def _find_head(traces: list[_Trace]) -> _Trace | None:
    """The last linear map (or 1x1 convolution) the forward pass ran: the one that gives the logits."""
    return next((t for t in reversed(traces) if t.single_tensor and is_linear_map(t.module)), None)


def _linear_chain(model: nn.Module, traces: list[_Trace], stage: list[str], head: _Trace | None) -> list[str]:
    """The linear layers that run after the stage, ending with the head (only the head without a stage)."""
    if head is None:
        return []
    if not stage:
        return [head.name]
    stage_modules = {m for name in stage for m in model.get_submodule(name).modules()}
    stage_end = max(i for i, t in enumerate(traces) if t.module in stage_modules)
    return [t.name for t in traces[stage_end + 1 :] if t.single_tensor and is_linear_map(t.module)]


def _find_stage(
    model: nn.Module, traces: list[_Trace], head: _Trace | None, input_size: tuple[int, int, int]
) -> list[str]:
    """The last blocks of a block stack that every path to the head crosses, covering enough weights (half of
    the feature extractor's) and at least two layers; a whole stack short of that is a block of its parent's."""
    parents = _parents(model)
    head_side = set(head.module.modules()) | {parents.get(head.name)} if head else set()
    traced = {t.name: t for t in traces}
    maps = [
        t for t in traces
        if is_editable(t) and not t.takes_network_input and t.output_shape and len(t.output_shape) >= 2
        and not head_side.intersection(t.module.modules())
    ]
    stacked = [t for t in maps if isinstance(parents.get(t.name), nn.Sequential) and parents[t.name] not in head_side]
    # Blocks kept as plain attributes (GoogLeNet, Inception v3): each one fed by the one before it.
    chained = [t for t in maps if _feeds(traced, _previous_sibling(parents, t.name), t.name)]
    last = _last_cut(model, stacked, input_size) or _last_cut(model, chained, input_size)
    if last is None:
        return []
    budget = STAGE_PARAM_FRACTION * _feature_parameters(traces, last)
    name = last.name
    while True:
        stack_name = name.rpartition(".")[0]
        stack = parents[name]
        siblings = _siblings(parents, name)
        end = siblings.index(name) + 1
        start = _grow_back(model, stack, siblings, end, budget, traced)
        whole = start == 0 and _weights(model, siblings[end:]) == 0
        if whole and _too_small(model, siblings, budget) and _can_climb(model, stack_name, traced, input_size):
            # The innermost stack cannot be the stage (ShuffleNetV2's conv5 is one pointwise convolution
            # with its norm): it becomes one block of the stack around it.
            name = stack_name
            continue
        if start == 0 and end == len(siblings) and stack_name:
            return [stack_name]
        return siblings[start:end]


def _grow_back(model: nn.Module, stack: nn.Module, siblings: list[str], end: int, budget: float,
               traced: dict[str, _Trace]) -> int:
    """Where the stage that ends at siblings[end - 1] starts: back while it is too small and each block feeds
    the next (always so in a Sequential)."""
    start = end - 1
    while (start > 0 and _too_small(model, siblings[start:end], budget)
           and (isinstance(stack, nn.Sequential) or _feeds(traced, siblings[start - 1], siblings[start]))):
        start -= 1
    return start


def _last_cut(model: nn.Module, candidates: list[_Trace], input_size: tuple[int, int, int]) -> _Trace | None:
    """The last of the candidates that every path to the output crosses."""
    return next((t for t in reversed(candidates) if is_cut(model, t.module, input_size)), None)


def _siblings(parents: dict[str, nn.Module], name: str) -> list[str]:
    """The full names of the children of `name`'s parent, `name` among them, in registration order."""
    prefix = name.rpartition(".")[0]
    return [f"{prefix}.{child}" if prefix else child for child, _ in parents[name].named_children()]


def _previous_sibling(parents: dict[str, nn.Module], name: str) -> str | None:
    """The name of the child registered just before `name` in its parent, if any."""
    siblings = _siblings(parents, name)
    index = siblings.index(name)
    return siblings[index - 1] if index else None


def feeds_in_turn(model: nn.Module, names: list[str], input_size: tuple[int, int, int]) -> bool:
    """Whether, in a dry run, each named module takes exactly the output of the one before it."""
    traced = {t.name: t for t in trace_modules(model, input_size)}
    return all(_feeds(traced, a, b) for a, b in zip(names, names[1:]))


def _feeds(traced: dict[str, _Trace], source: str | None, sink: str) -> bool:
    """Whether the dry run gave `sink` the very tensor `source` returned."""
    a, b = traced.get(source), traced.get(sink)
    return a is not None and b is not None and a.output_id is not None and a.output_id == b.input_id


def _can_climb(model: nn.Module, name: str, traced: dict[str, _Trace], input_size: tuple[int, int, int]) -> bool:
    """Whether a whole stack can stand as one block of its parent: it ran once on one tensor and is a cut."""
    return bool(name) and name in traced and traced[name].single_tensor and is_cut(
        model, model.get_submodule(name), input_size)


def _too_small(model: nn.Module, names: list[str], budget: float) -> bool:
    """Whether the modules hold under `budget` weights, or a single layer: a stage has depth to retrain."""
    return _weights(model, names) < budget or _depth(model, names) < 2


def _depth(model: nn.Module, names: list[str]) -> int:
    """The number of convolutions and linear maps (leaves with a weight matrix; norms have vectors) in the modules."""
    leaves = (m for name in names for m in model.get_submodule(name).modules() if not list(m.children()))
    return sum(1 for m in leaves if any(p.dim() > 1 for p in m.parameters(recurse=False)))


def _weights(model: nn.Module, names: list[str]) -> int:
    return sum(count_parameters(model.get_submodule(name)) for name in names)


def is_cut(model: nn.Module, module: nn.Module, input_size: tuple[int, int, int]) -> bool:
    """True when the model's output depends on its input only through `module`'s output."""
    network_input = torch.randn(1, *input_size, device=_device_of(model), requires_grad=True)
    handle = module.register_forward_hook(lambda _m, _a, output: output.detach().requires_grad_().clone())
    try:
        with torch.enable_grad():
            output = model.eval()(network_input)
            (gradient,) = torch.autograd.grad(output.sum(), network_input, allow_unused=True)
    finally:
        handle.remove()
    return gradient is None


def _feature_parameters(traces: list[_Trace], stage_end: _Trace) -> int:
    """Weights of the leaf modules that finished no later than the end of the stage."""
    finished = traces[: traces.index(stage_end) + 1]
    return sum(count_parameters(t.module) for t in finished if not list(t.module.children()))


def _parents(model: nn.Module) -> dict[str, nn.Module]:
    return {
        f"{name}.{child_name}" if name else child_name: module
        for name, module in model.named_modules()
        for child_name, _ in module.named_children()
    }


def _first_calls(traces: list[_Trace]) -> list[_Trace]:
    seen: set[str] = set()
    unique = []
    for trace in traces:
        if trace.name not in seen:
            seen.add(trace.name)
            unique.append(trace)
    return unique


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")

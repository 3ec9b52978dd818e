"""The batch-norm layer protocol (bnlab.protocol) and our layers as torch.nn citizens: isinstance, torch's
SyncBatchNorm conversion, torch.fx tracing, selection by type, torch.compile without graph breaks."""

import ast
import copy
import pathlib
import types
import warnings

import pytest
import torch
from torch import nn

from bnlab import models, protocol
from bnlab.nn import fused
from bnlab.nn import sync as distributed
from bnlab import nn as bnn
from bnlab.nn import variants as V
from bnlab.tools import freeze as FZ
from bnlab.tools.fold import fold_bn

TorchBN = nn.modules.batchnorm._BatchNorm
OURS = [lambda: bnn.BatchNorm2d(4), lambda: V.GhostBatchNorm2d(4, virtual_batch_size=2),
        lambda: V.BatchRenorm2d(4), lambda: distributed.SyncBatchNorm(4), lambda: fused.BatchNormReLU2d(4)]


def _pair(seed=0):
    """A torch.nn model and the same model (same state) with bnlab layers."""
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    return ref, bnn.convert(copy.deepcopy(ref), "bnlab")


def _assert_same_state(ours, ref):
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


# --------------------------------------------------------------------------------------------------
# torch.nn citizens
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", OURS)
def test_our_layers_are_torch_batch_norms(make):
    layer = make()
    assert isinstance(layer, TorchBN) and isinstance(layer, nn.modules.batchnorm._NormBase)
    assert protocol.is_batch_norm(layer)


def test_torch_convert_sync_batchnorm_converts_our_layers_keeping_state():
    ref, ours = _pair()
    ours(torch.randn(6, 3, 8, 8))                       # some state of our own
    expected = copy.deepcopy(ours.state_dict())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(ours)
    assert [type(m) for m in synced.modules()].count(nn.SyncBatchNorm) == 2
    for key, value in synced.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_weight_decay_exclusion_by_type_finds_our_layers():
    """The common recipe: no weight decay on parameters of modules that are _BatchNorm instances."""
    ref, ours = _pair()

    def no_decay(model):
        return {id(p) for m in model.modules() if isinstance(m, TorchBN) for p in m.parameters(recurse=False)}

    assert len(no_decay(ours)) == len(no_decay(ref)) == 4


@pytest.mark.parametrize("training", [True, False])
def test_fx_symbolic_trace_of_our_layers_matches_torch(training):
    ref, ours = _pair(1)
    ref.train(training), ours.train(training)
    traced = torch.fx.symbolic_trace(ours)
    assert "fx_batch_norm" in traced.code
    x = torch.randn(6, 3, 9, 9)
    torch.testing.assert_close(traced(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traced(x), ref(x), atol=1e-5, rtol=1e-5)   # twice: statistics move
    _assert_same_state(ours, ref)                                          # the graph shares ours' buffers


def test_torch_compile_fullgraph_training_has_no_graph_break_and_matches_torch():
    ref, ours = _pair(2)
    ours[1].skipped_updates = 0
    x = torch.randn(6, 3, 8, 8)
    explanation = torch._dynamo.explain(copy.deepcopy(ours).train())(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    for _ in range(2):
        torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5)
    _assert_same_state(ours, ref)
    # the non-finite decision stays on the device: the batch is kept out of the statistics
    before = ours[1].running_mean.clone()
    compiled(torch.full_like(x, float("nan")))
    torch.testing.assert_close(ours[1].running_mean, before)


# --------------------------------------------------------------------------------------------------
# the protocol
# --------------------------------------------------------------------------------------------------

def test_capabilities_of_known_layers():
    cases = {nn.BatchNorm2d(3): (True, True, "plain"), nn.SyncBatchNorm(3): (False, True, "keep"),
             bnn.BatchNorm2d(3): (True, True, "plain"), V.GhostBatchNorm2d(3): (False, True, "keep"),
             V.BatchRenorm2d(3): (False, True, "renorm"), distributed.SyncBatchNorm(3): (False, True, "keep"),
             distributed.SyncBatchRenorm(3): (False, True, "keep"), FZ.FrozenBatchNorm2d(3): (False, True, "keep"),
             fused.BatchNormReLU2d(3): (True, False, None)}
    for layer, want in cases.items():
        got = tuple(protocol.capability(layer, c) for c in ("bn_plain_training", "bn_plain_inference", "bn_sync"))
        assert got == want, type(layer).__name__


def test_a_subclass_overriding_forward_gets_conservative_answers():
    class Doubled(bnn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    class Declared(Doubled):
        bn_plain_training = True

    layer = Doubled(3)
    assert protocol.is_batch_norm(layer)
    assert [protocol.capability(layer, c) for c in ("bn_plain_training", "bn_plain_inference", "bn_sync")] == \
        [False, False, None]
    assert protocol.capability(Declared(3), "bn_plain_training") is True
    with pytest.raises(TypeError, match="Doubled"):
        distributed.convert_sync_batchnorm(nn.Sequential(layer))
    with pytest.raises(ValueError, match="unknown capability"):
        protocol.capability(layer, "bn_fast")


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(3), bnn.BatchNorm1d(3)])
def test_uses_and_updates_follow_mode_and_switches(layer):
    layer.train()
    assert protocol.uses_batch_stats(layer) and protocol.updates_running_stats(layer)
    layer.eval()
    assert not protocol.uses_batch_stats(layer) and not protocol.updates_running_stats(layer)
    FZ.set_bn_switches(layer, use_batch_stats=True, update_running_stats=False)
    layer.train()
    assert protocol.uses_batch_stats(layer) and not protocol.updates_running_stats(layer)
    FZ.freeze_stats(layer)
    assert not protocol.uses_batch_stats(layer) and not protocol.updates_running_stats(layer)


def test_frozen_layers_never_use_or_update_batch_statistics():
    layer = FZ.FrozenBatchNorm2d(3).train()
    assert protocol.is_batch_norm(layer)
    assert not protocol.uses_batch_stats(layer) and not protocol.updates_running_stats(layer)


def test_snapshot_restore_round_trip():
    layer = bnn.BatchNorm1d(3).train()
    saved = protocol.snapshot(layer)
    layer(torch.randn(8, 3) + 5)
    assert int(layer.num_batches_tracked) == 1
    protocol.restore(layer, saved)
    torch.testing.assert_close(layer.running_mean, torch.zeros(3))
    torch.testing.assert_close(layer.running_var, torch.ones(3))
    assert int(layer.num_batches_tracked) == 0


def test_replace_layers_walks_once_and_names_paths():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), nn.BatchNorm1d(3))
    seen = []

    def make(name, m):
        seen.append(name)
        return nn.Identity() if isinstance(m, nn.BatchNorm1d) else None

    protocol.replace_layers(model, make)
    assert seen == ["", "0", "1", "1.0", "1.1", "2"]
    assert isinstance(model[1][0], nn.Identity) and isinstance(model[2], nn.Identity)
    assert isinstance(protocol.replace_layers(nn.BatchNorm1d(3), make), nn.Identity)


# --------------------------------------------------------------------------------------------------
# messages name the layer by its path; half-precision overflow; folding a model in training mode
# --------------------------------------------------------------------------------------------------

def test_nonfinite_warning_names_the_layer_path_in_a_built_model():
    net = models.create("resnet8", in_channels=1).train()
    x = torch.randn(2, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(x)
    messages = [str(w.message) for w in caught if "not finite" in str(w.message)]
    assert messages and messages[0].startswith("stem.1 (BatchNorm2d(16)):")
    assert len({m.split(" ")[0] for m in messages}) == len(messages)   # each layer named differently


def test_converted_layers_know_their_path():
    model = bnn.convert(nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4))), "bnlab")
    with pytest.warns(RuntimeWarning, match=r"^1\.0 \(BatchNorm1d\(4\)\): the batch statistics are not finite"):
        model(torch.full((4, 3), float("inf")))


def test_float16_running_variance_overflow_is_kept_out():
    """Input mean 3e4 with spread 1e3 in float16: the unbiased variance (~1e6) does not fit a float16
    running_var (max 65504); the update is skipped, never written as Inf/NaN."""
    torch.manual_seed(0)
    layer = bnn.BatchNorm2d(3).half()
    x = (torch.randn(8, 3, 4, 4) * 1e3 + 3e4).half()
    with pytest.warns(RuntimeWarning, match="not finite"):
        for _ in range(3):
            layer(x)
    assert torch.isfinite(layer.running_var).all() and torch.isfinite(layer.running_mean).all()
    assert layer.skipped_updates == 3 and int(layer.num_batches_tracked) == 0


def test_fold_bn_of_a_model_in_training_mode_warns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnn.BatchNorm2d(4)).train()
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6) * 3 + 2)
    x = torch.randn(8, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"fold_bn: 1 batch-norm layer.*\b1\b.*model\.eval\(\)"):
        folded, _ = fold_bn(model)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() > 0.1       # it differs from the model as called
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fold_bn(model.eval())                                  # eval mode: no warning


# --------------------------------------------------------------------------------------------------
# the import graph: no cycles, and no module importing a module of a higher layer
# --------------------------------------------------------------------------------------------------

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "bnlab"

# The layers, lowest first. A module may import modules of its own layer or a lower one, never a higher one.
# The one-release aliases of moved modules (bnlab.fold, bnlab.variants, …) sit outside: nothing imports them.
LAYERS = [
    ("bnlab.errors", "bnlab.dtypes", "bnlab._moved", "bnlab.reference"),
    ("bnlab.protocol", "bnlab.kernels"),
    ("bnlab.functional",),
    ("bnlab.nn",),
    ("bnlab.tools",),
    ("bnlab.models",),
    ("bnlab.data",),
    ("bnlab.checkpoint", "bnlab.train"),
    ("bnlab.study",),
    ("bnlab.commands", "bnlab.cli", "bnlab.__main__"),
]
ALIASES = {"bnlab.fold", "bnlab.recalibrate", "bnlab.accumulate", "bnlab.amp", "bnlab.doctor", "bnlab.frozen",
           "bnlab.distributed", "bnlab.fused", "bnlab.variants", "bnlab.cifar", "bnlab.datadirs"}


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnlab"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("bnlab"))
    return names


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return modules


def _layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS")


def _graph() -> dict[str, set[str]]:
    modules = {n: p for n, p in _modules().items() if n not in ALIASES and n != "bnlab"}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    for name in graph:   # a package imports its __init__ implicitly: not an edge worth a cycle
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    return graph


def test_no_import_cycles():
    graph = _graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(name for name in graph if name in reach(name))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{name} (layer {_layer(name)}) imports {m} (layer {_layer(m)})"
                    for name, deps in _graph().items() for m in deps if _layer(m) > _layer(name))
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_moved_aliases():
    users = sorted(f"{name} imports {m}" for name, path in _modules().items() for m in _imports(path)
                   if m in ALIASES and name not in ALIASES)
    assert not users, users


def test_fused_path_never_bypasses_a_subclass_forward_in_eval(monkeypatch):
    class Doubled(bnn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Doubled(3).eval()
    x = torch.randn(2, 3, 4, 4)
    expected = torch.relu(layer(x))
    # bnlab.nn.fused as on a GPU, where it would run the plain kernels instead of a plain layer's forward
    monkeypatch.setattr(fused, "F", types.SimpleNamespace(backend_for=lambda x, backend="auto": "triton"))
    torch.testing.assert_close(fused.batch_norm_relu(layer, x), expected)

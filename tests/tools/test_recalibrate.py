"""bnlab.tools.recalibrate: the recalibrated running statistics equal the exact statistics of each layer's
inputs, computed here independently by running the layers by hand with torch.nn.functional.batch_norm."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from bnlab import nn as bnn
from bnlab.nn import variants as V
from bnlab.tools import freeze as FZ
from bnlab.tools.recalibrate import recalibrate_bn


def _model(bn2d, bn1d):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 5, 1),
                         bn2d(5), nn.Flatten(), nn.Linear(5 * 16, 6), bn1d(6))


def _layer_inputs(model, x):
    """The inputs each BN layer sees with BN in training mode and dropout off, computed by hand."""
    conv1, bn1, _, _, conv2, bn2, _, fc, bn3 = model
    inputs = []
    h = conv1(x)
    inputs.append(h)
    h = conv2(torch.relu(TF.batch_norm(h, None, None, bn1.weight, bn1.bias, True, eps=bn1.eps)))
    inputs.append(h)
    h = fc(TF.batch_norm(h, None, None, bn2.weight, bn2.bias, True, eps=bn2.eps).flatten(1))
    inputs.append(h)
    return inputs


def _batches(k=5):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(n, 3, 6, 6, generator=gen) * 2 + 1 for n in (8, 5, 7, 8, 6)[:k]]


@pytest.mark.parametrize("bn2d,bn1d", [(nn.BatchNorm2d, nn.BatchNorm1d), (bnn.BatchNorm2d, bnn.BatchNorm1d)])
@pytest.mark.parametrize("mode", ["batch_average", "population"])
def test_recalibration_equals_exact_statistics(bn2d, bn1d, mode):
    model = _model(bn2d, bn1d).double()
    model.eval()
    batches = [b.double() for b in _batches()]
    with torch.no_grad():
        per_layer = list(zip(*[_layer_inputs(model, b) for b in batches]))   # layer → list of inputs
    old = [(m.running_mean.clone(), m.running_var.clone()) for m in (model[1], model[5], model[8])]
    report = recalibrate_bn(model, [(b, torch.zeros(len(b))) for b in batches], num_batches=None, mode=mode)

    for (name, layer), inputs, (old_mean, old_var) in zip(
            [("1", model[1]), ("5", model[5]), ("8", model[8])], per_layer, old):
        dims = [0] + list(range(2, inputs[0].dim()))
        if mode == "batch_average":
            mean = torch.stack([t.mean(dims) for t in inputs]).mean(0)
            var = torch.stack([t.var(dims, unbiased=True) for t in inputs]).mean(0)
        else:
            flat = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in inputs], 1)
            mean, var = flat.mean(1), flat.var(1, unbiased=True)
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)
        assert int(layer.num_batches_tracked) == len(batches)
        expected_shift = ((mean - old_mean).abs() / (old_var + layer.eps).sqrt()).max()
        assert report[name].mean_shift == pytest.approx(float(expected_shift))
    assert not model.training and not model[3].training and not model[1].training   # modes restored


def test_recalibration_after_weight_averaging_and_num_batches():
    # SWA-style: the average of two trained models' weights has no valid running statistics of its own
    a, b = _model(nn.BatchNorm2d, nn.BatchNorm1d), _model(nn.BatchNorm2d, nn.BatchNorm1d)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p))
    averaged = torch.optim.swa_utils.AveragedModel(a)
    averaged.update_parameters(b)
    averaged.module.train()
    batches = _batches()
    recalibrate_bn(averaged, batches, num_batches=2)
    with torch.no_grad():
        inputs = [_layer_inputs(averaged.module, x)[0] for x in batches[:2]]
    expected = torch.stack([t.mean((0, 2, 3)) for t in inputs]).mean(0)
    torch.testing.assert_close(averaged.module[1].running_mean, expected)
    assert averaged.module.training                                   # mode restored


def test_frozen_layers_are_recalibrated_and_stay_frozen():
    model = _model(bnn.BatchNorm2d, bnn.BatchNorm1d)
    FZ.freeze_stats(model)
    batches = _batches(3)
    recalibrate_bn(model, batches)
    assert model[1].use_batch_stats is False and model[1].update_running_stats is False
    with torch.no_grad():
        inputs = [_layer_inputs(model, x)[1] for x in batches]   # depends on bn1 using batch statistics
    torch.testing.assert_close(model[5].running_mean, torch.stack([t.mean((0, 2, 3)) for t in inputs]).mean(0))


def test_recalibrate_refuses_bad_input():
    model = _model(nn.BatchNorm2d, nn.BatchNorm1d)
    with pytest.raises(ValueError, match="mode must be"):
        recalibrate_bn(model, _batches(), mode="ema")
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recalibrate_bn(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(TypeError, match="cannot find the input"):
        recalibrate_bn(model, [object()])


class _KeywordModel(nn.Module):
    """A Hugging Face style model: called as model(pixel_values=...), no labels argument."""

    def __init__(self, bn2d, bn1d):
        super().__init__()
        self.net = _model(bn2d, bn1d)

    def forward(self, pixel_values):
        return self.net(pixel_values)


@pytest.mark.parametrize("form", ["mapping", "mapping_with_labels", "tuple_of_mapping", "list", "tuple"])
def test_recalibration_takes_the_batch_forms_of_other_libraries(form):
    """Issue 21 item 10: {"pixel_values": x} batches needed a custom forward=. Every form gives the exact
    statistics of the layers' inputs (computed by hand, as above)."""
    wrapper = _KeywordModel(nn.BatchNorm2d, nn.BatchNorm1d).double().eval()
    batches = [b.double() for b in _batches()]
    labels = [torch.zeros(len(b), dtype=torch.long) for b in batches]
    loader = {"mapping": [{"pixel_values": b} for b in batches],
              "mapping_with_labels": [{"pixel_values": b, "labels": y} for b, y in zip(batches, labels)],
              "tuple_of_mapping": [({"pixel_values": b}, y) for b, y in zip(batches, labels)],
              "list": [[b, y] for b, y in zip(batches, labels)],
              "tuple": [(b, y, "extra") for b, y in zip(batches, labels)]}[form]
    if form in ("list", "tuple"):   # positional: the inner network itself
        model, layers = wrapper.net, wrapper.net
    else:
        model, layers = wrapper, wrapper.net
    with torch.no_grad():
        per_layer = list(zip(*[_layer_inputs(layers, b) for b in batches]))
    recalibrate_bn(model, loader, num_batches=None)
    for layer, inputs in zip((layers[1], layers[5], layers[8]), per_layer):
        dims = [0] + list(range(2, inputs[0].dim()))
        torch.testing.assert_close(layer.running_mean, torch.stack([t.mean(dims) for t in inputs]).mean(0))
        torch.testing.assert_close(layer.running_var, torch.stack([t.var(dims) for t in inputs]).mean(0))


def test_batch_inputs_rules():
    from bnlab.tools.recalibrate import batch_inputs
    x, y = torch.randn(2, 3), torch.zeros(2)
    assert batch_inputs(x)[0][0] is x
    assert batch_inputs({"input": x, "target": y})[0][0] is x and batch_inputs({"input": x})[1] == {}
    args, kwargs = batch_inputs({"pixel_values": x, "attention_mask": y, "labels": y, "label_ids": y})
    assert args == () and set(kwargs) == {"pixel_values", "attention_mask"}
    pair = [x, x]
    assert batch_inputs((pair, y))[0][0] is pair                   # as torch.optim.swa_utils.update_bn
    with pytest.raises(TypeError, match="holds only targets"):
        batch_inputs({"labels": y})
    with pytest.raises(TypeError, match="cannot find the input"):
        batch_inputs(("a string", y))

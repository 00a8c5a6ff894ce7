"""Models: built-in and user models become StagedModels that map flat rows to class logits, and learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestrator.config import BuiltinModel, DataConfig, ModelConfig, to_config
from orchestrator.training.data import load_split, prepare_dataset
from orchestrator.training.models import StagedModel, build_model
from tests.unit import user_models

DIGITS_SHAPE = [1, 8, 8]


def _flat_batch(rows: int = 5) -> torch.Tensor:
    return torch.rand(rows, 64)  # rows arrive flat, as load_split and Ray Data deliver them


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_builtin_models_map_flat_rows_to_logits(name):
    model = build_model(ModelConfig(name=name), DIGITS_SHAPE, num_classes=10)
    assert isinstance(model, StagedModel)
    assert model(_flat_batch(5)).shape == (5, 10)


def test_mlp_stages_follow_hidden_in_order():
    model = build_model(ModelConfig(name=BuiltinModel.mlp, hidden=[32, 16, 8]), [64], num_classes=3)
    assert model.stage_names == ["block0", "block1", "block2"]
    assert [stage[-2].out_features for stage in model.stages.values()] == [32, 16, 8]
    assert (model.head.in_features, model.head.out_features) == (8, 3)


def test_cnn_stages_are_convolutions_then_dense():
    cfg = ModelConfig(name=BuiltinModel.cnn, channels=[4, 8, 8, 8], hidden=[12])
    model = build_model(cfg, DIGITS_SHAPE, num_classes=10)
    # 8x8 pools to 4, 2, 1; the fourth conv cannot halve a 1x1 map and must still work.
    assert model.stage_names == ["conv0", "conv1", "conv2", "conv3", "dense"]
    assert model(_flat_batch(2)).shape == (2, 10)


def test_cnn_needs_an_image_shape():
    with pytest.raises(ValueError, match="input_shape"):
        build_model(ModelConfig(name=BuiltinModel.cnn), [64], num_classes=10)


def test_dropout_is_added_to_every_stage():
    model = build_model(ModelConfig(name=BuiltinModel.mlp, hidden=[8, 8], dropout=0.5), [4], num_classes=2)
    assert all(isinstance(stage[-1], nn.Dropout) for stage in model.stages.values())


def test_user_sequential_factory_becomes_a_staged_model_with_the_same_function():
    cfg = ModelConfig(_target_="tests.unit.user_models.sequential_net", kwargs={"width": 7})
    torch.manual_seed(0)
    model = build_model(cfg, DIGITS_SHAPE, num_classes=10)
    torch.manual_seed(0)
    reference = user_models.sequential_net(64, 10, width=7)

    assert isinstance(model, StagedModel)
    assert model.stage_names == ["0", "1", "2"]
    assert isinstance(model.head, nn.Linear) and (model.head.in_features, model.head.out_features) == (7, 10)
    x = _flat_batch(4)
    assert torch.equal(model(x), reference(x))


def test_user_class_gets_only_the_arguments_it_accepts():
    model = build_model(ModelConfig(_target_="tests.unit.user_models.TwoLayerNet"), DIGITS_SHAPE, num_classes=10)
    assert model.stage_names == ["flatten", "hidden", "act"]
    assert model.head.out_features == 10 and model.stages["hidden"].out_features == 16
    assert model(_flat_batch(3)).shape == (3, 10)


def test_user_model_from_the_command_line(compose):
    cfg = to_config(
        compose(["model=custom", "model._target_=tests.unit.user_models.TwoLayerNet", "+model.kwargs.width=5"])
    )
    model = build_model(cfg.model, cfg.data.input_shape, num_classes=10)
    assert model.stages["hidden"].out_features == 5


@pytest.mark.parametrize("target", ["bare_linear", "head_only"])
def test_user_model_without_stages_and_head_is_refused(target):
    with pytest.raises(TypeError, match=f"user_models.{target}"):
        build_model(ModelConfig(_target_=f"tests.unit.user_models.{target}"), DIGITS_SHAPE, num_classes=10)


def test_user_model_that_does_not_import_fails():
    with pytest.raises(Exception, match="no_such_thing"):
        build_model(ModelConfig(_target_="tests.unit.user_models.no_such_thing"), DIGITS_SHAPE, num_classes=10)


def test_staged_model_needs_a_stage():
    with pytest.raises(ValueError, match="stage"):
        StagedModel({}, nn.Linear(4, 2), [4])


@pytest.fixture
def one_thread():
    # A model this small runs fastest on one thread; more only contend with other work on a small machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_mlp_learns_digits(tmp_path, one_thread):
    info = prepare_dataset(DataConfig(source="digits", input_shape=DIGITS_SHAPE), tmp_path.as_uri())
    x_train, y_train = (torch.from_numpy(a) for a in load_split(info, "train"))
    x_val, y_val = (torch.from_numpy(a) for a in load_split(info, "val"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=BuiltinModel.mlp, hidden=[64]), info.input_shape, info.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        batch = torch.randint(0, len(y_train), (64,))
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_val).argmax(dim=1) == y_val).float().mean().item()

    assert accuracy > 0.9

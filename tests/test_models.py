import pytest
import torch

from pipeline.training.config import TrainConfig
from pipeline.training.models import CNN, MLP, Dropout, build_model, count_parameters


def linear(n_in, n_out):
    return n_in * n_out + n_out


def test_the_notebook_mlp_has_its_layers_and_parameter_count():
    model = MLP()
    # 784-512-256-128-10 with a batch norm (scale and shift) after each hidden layer.
    expected = (linear(784, 512) + 2 * 512 + linear(512, 256) + 2 * 256 + linear(256, 128) + 2 * 128
                + linear(128, 10))
    assert count_parameters(model) == expected
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [512, 256, 128, 10]
    assert isinstance(model[-1], torch.nn.LogSoftmax)


@pytest.mark.parametrize("config", [
    TrainConfig(),
    TrainConfig(hidden_sizes=(32,), batch_norm=False, dropout=0.0),
    TrainConfig(model="cnn"),
    TrainConfig(model="cnn", cnn_channels=(8, 16, 32), cnn_convs_per_stage=3, cnn_residual=True, cnn_head_width=0),
], ids=["mlp", "mlp-narrow", "cnn", "cnn-residual-3-stages"])
def test_models_map_images_to_log_probabilities(config):
    model = build_model(config).eval()
    log_probs = model(torch.randn(5, 1, 28, 28))
    assert log_probs.shape == (5, 10)
    assert torch.allclose(log_probs.exp().sum(dim=1), torch.ones(5), atol=1e-5)


def test_cnn_parameter_count_follows_its_shape():
    model = CNN((8, 16), convs_per_stage=2, head_width=32)
    conv = lambda c_in, c_out: 9 * c_in * c_out + 2 * c_out  # bias-free conv + batch norm
    expected = (conv(1, 8) + conv(8, 8) + conv(8, 16) + conv(16, 16)
                + linear(16 * 7 * 7, 32) + 2 * 32 + linear(32, 10))
    assert count_parameters(model) == expected


def test_residual_blocks_add_skips_without_parameters():
    plain = CNN((8, 16), convs_per_stage=3, residual=False)
    residual = CNN((8, 16), convs_per_stage=3, residual=True)
    assert count_parameters(plain) == count_parameters(residual)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    residual.load_state_dict(plain.state_dict())
    assert not torch.allclose(plain.eval()(x), residual.eval()(x))


def test_dropout_drops_a_fraction_p_and_rescales_the_rest_like_torchs():
    x = torch.ones(400, 500, requires_grad=True)
    dropout = Dropout(0.3).train()
    torch.manual_seed(0)
    out = dropout(x)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))
    out.sum().backward()  # the gradient flows through the survivors only, scaled the same way
    assert torch.equal(x.grad, out.detach())
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out)  # seeded like nn.Dropout: runs repeat
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_dropout_on_channels_last_bfloat16_activations_keeps_their_dtype_layout_and_rate():
    # The CNN's activations under autocast: bfloat16, channels-last, a count not divisible by 4.
    x = torch.ones(201, 5, 7, 9, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    out = Dropout(0.25).train()(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert torch.allclose(out[kept].float(), torch.full_like(out[kept].float(), 1 / 0.75), rtol=1e-2)
    assert kept.float().mean(dim=(0, 2, 3)).min().item() > 0.7  # every channel dropped alike
    from pipeline.training.models import _keep_mask

    assert _keep_mask(x, 16384).stride() == x.stride()  # the mask streams in the activations' memory order


def test_pool_first_makes_the_rest_of_each_stage_work_at_half_the_side():
    def input_sides(pool_first):
        model = CNN((8, 16), convs_per_stage=2, pool_first=pool_first).eval()
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        sides = []
        for conv in convs:
            conv.register_forward_hook(lambda module, inputs, output: sides.append(inputs[0].shape[-1]))
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        return sides, count_parameters(model)

    assert input_sides(False) == ([28, 28, 14, 14], input_sides(True)[1])
    assert input_sides(True)[0] == [28, 14, 14, 7]  # each stage's second conv after its pooling

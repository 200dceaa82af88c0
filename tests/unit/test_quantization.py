"""RTN math on a toy Linear, the on-disk format, and layer selection."""

import numpy as np
import pytest
import torch

from pipeline.quantization import is_ignored
from pipeline.quantization.format import load_quantized, save_quantized
from pipeline.quantization.rtn import quantize_rtn
from pipeline.stages.quantize import QuantizeError, check_group_size


@pytest.fixture
def weight() -> np.ndarray:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 6).weight.detach().numpy()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_codes_in_range_and_error_within_half_a_step(weight, bits, symmetric):
    q = quantize_rtn(weight, bits=bits, group_size=16, symmetric=symmetric)
    assert q.codes.shape == weight.shape and q.scales.shape == (6, 4)
    if symmetric:
        assert q.zeros is None and q.codes.dtype == np.int8
        assert q.codes.min() >= -(2 ** (bits - 1)) and q.codes.max() <= 2 ** (bits - 1) - 1
    else:
        assert q.codes.dtype == np.uint8 and q.codes.max() <= 2**bits - 1
        assert q.zeros.shape == (6, 4) and q.zeros.max() <= 2**bits - 1
    err = np.abs(q.dequantize() - weight)
    step = np.repeat(q.scales, 16, axis=1)
    assert np.all(err <= step / 2 + 1e-6)


def test_more_bits_and_smaller_groups_are_more_accurate(weight):
    def rel(bits, g):
        return np.linalg.norm(quantize_rtn(weight, bits, g, False).dequantize() - weight)

    assert rel(8, 16) < rel(4, 16) < rel(4, 64)


def test_zero_weight_group_is_exact():
    w = np.zeros((2, 32), np.float32)
    w[1, 16:] = np.linspace(-1, 1, 16)
    for sym in (False, True):
        q = quantize_rtn(w, 4, 16, sym)
        assert np.all(q.dequantize()[0] == 0) and np.all(np.isfinite(q.scales))


def test_group_size_must_divide(weight):
    with pytest.raises(ValueError, match="does not divide"):
        quantize_rtn(weight, 4, 48, False)
    with pytest.raises(QuantizeError, match=r"group_size: 128 does not divide in_features 576 of layer.q; 16 or 32 or 64 would"):
        check_group_size({"layer.q": 576}, 128)


def test_format_roundtrip_is_exact(weight, tmp_path):
    layers = {"a.q_proj": quantize_rtn(weight, 4, 16, False), "b.k_proj": quantize_rtn(weight, 4, 32, True)}
    save_quantized(tmp_path / "q.safetensors", layers, {"method": "rtn"})
    back = load_quantized(tmp_path / "q.safetensors")
    assert set(back) == set(layers)
    for name, q in layers.items():
        np.testing.assert_array_equal(back[name].codes, q.codes)
        assert back[name].codes.dtype == q.codes.dtype  # uint8 codes, or int8 sign-extended from their nibble
        np.testing.assert_array_equal(back[name].scales, q.scales)
        assert (back[name].zeros is None) == (q.zeros is None)


def test_4bit_codes_are_stored_two_a_byte_and_v1_files_still_read(weight, tmp_path):
    from safetensors.numpy import load_file, save_file

    from pipeline.quantization.format import HEADER_KEY

    q = quantize_rtn(weight, 4, 16, True)
    save_quantized(tmp_path / "q.safetensors", {"a.q_proj": q}, {"method": "rtn"})
    assert load_file(str(tmp_path / "q.safetensors"))["a.q_proj.codes"].shape == (6, 32)  # 64 codes a row, packed
    v1 = {"a.q_proj.codes": q.codes, "a.q_proj.scales": q.scales}  # the layout before packing
    save_file(v1, str(tmp_path / "v1.safetensors"),
              metadata={HEADER_KEY: '{"bits": "4", "format": "kiln-intq-v1", "group_size": "16", "method": "rtn"}'})
    np.testing.assert_array_equal(load_quantized(tmp_path / "v1.safetensors")["a.q_proj"].codes, q.codes)


def test_ignore_matches_names_and_dotted_suffixes():
    assert is_ignored("lm_head", ["lm_head"])
    assert is_ignored("model.layers.3.mlp.down_proj", ["mlp.down_proj"])
    assert not is_ignored("model.layers.3.mlp.down_proj_x", ["down_proj"])



def test_layers_are_chosen_from_the_model_structure_without_its_weights(tmp_path):
    from pipeline.modeling.hf import make_random_model
    from pipeline.recipe import RandomModelConfig
    from pipeline.stages.quantize import linear_layers

    make_random_model(RandomModelConfig(family="llama", intermediate_size=96), tmp_path)
    chosen, skipped = linear_layers(tmp_path, ("lm_head", "mlp.down_proj"))
    assert skipped == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    assert len(chosen) == 12 and chosen["model.layers.0.mlp.gate_proj"] == 64 and chosen["model.layers.1.self_attn.o_proj"] == 64

"""Codebooks: bit-identical to bitsandbytes' tables, and the properties the formats rely on."""

import pytest
import torch

from tritonbits import codebooks
from tritonbits.functional import get_4bit_type


@pytest.mark.parametrize("typename", ["nf4", "fp4", "af4", "int4"])
def test_4bit_tables_match_bitsandbytes(typename, bnb_ref):
    bnbf = bnb_ref.functional
    ours = get_4bit_type(typename)
    if typename == "int4":
        # bitsandbytes 0.50.2 cannot build its int4 table (integer tensor divided in place), so
        # check ours against the definition: 7..0, -0..-7 scaled by 1/7.
        expected = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7], dtype=torch.float32) / 7
        assert torch.equal(ours, expected)
        return
    assert torch.equal(ours, bnbf.get_4bit_type(typename, device="cpu"))


def test_nf4_is_the_normal_map():
    # NF4 = the 16 non-padding values of create_normal_map(), exactly (float32).
    normal = codebooks.create_normal_map()
    nonzero_and_zero = torch.cat([normal[:7], normal[-9:]])
    assert torch.equal(nonzero_and_zero, get_4bit_type("nf4"))


def test_fp4_layout():
    # Bit 3 is the sign: code c | 8 is the negative of code c; magnitudes x12 are 0, 1/16, 8, 12, 4, 6, 2, 3.
    fp4 = get_4bit_type("fp4")
    assert torch.equal(fp4[8:], -fp4[:8])
    assert torch.equal(fp4[:8] * 12, torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("max_exponent_bits", [7, 5, 4])
@pytest.mark.parametrize("total_bits", [8, 7])
def test_dynamic_map_matches_bitsandbytes(signed, max_exponent_bits, total_bits, bnb_ref):
    bnbf = bnb_ref.functional
    try:
        theirs = bnbf.create_dynamic_map(signed, max_exponent_bits, total_bits)
    except AssertionError:  # bitsandbytes asserts on some unsigned combinations
        with pytest.raises(ValueError):  # bitsandbytes rejects it: so do we, with a clear error
            codebooks.create_dynamic_map(signed, max_exponent_bits, total_bits)
        return
    assert torch.equal(codebooks.create_dynamic_map(signed, max_exponent_bits, total_bits), theirs)


def test_dynamic_map_shape_and_order():
    code = codebooks.create_dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1]), "the signed dynamic map is strictly increasing"
    assert code.min() > -1.0, "the signed dynamic map has no -1 (it is not symmetric)"
    assert code.max() == 1.0 and (code == 0).sum() == 1


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("total_bits", [8, 4])
@pytest.mark.parametrize("add_zero", [True, False])
def test_linear_map_matches_bitsandbytes(signed, total_bits, add_zero, bnb_ref):
    bnbf = bnb_ref.functional
    assert torch.equal(
        codebooks.create_linear_map(signed, total_bits, add_zero), bnbf.create_linear_map(signed, total_bits, add_zero)
    )


@pytest.mark.parametrize("offset", [0.9677083, 0.99])
@pytest.mark.parametrize("use_extra_value", [True, False])
def test_normal_map_matches_bitsandbytes(offset, use_extra_value, bnb_ref):
    bnbf = bnb_ref.functional
    pytest.importorskip("scipy", reason="bitsandbytes' create_normal_map needs scipy")
    assert torch.equal(
        codebooks.create_normal_map(offset, use_extra_value), bnbf.create_normal_map(offset, use_extra_value)
    )


@pytest.mark.parametrize("args", [(True, 5, 2, 8), (True, 4, 3, 8), (True, 2, 1, 4), (False, 4, 4, 8)])
def test_fp8_map_matches_bitsandbytes(args, bnb_ref):
    bnbf = bnb_ref.functional
    assert torch.equal(codebooks.create_fp8_map(*args), bnbf.create_fp8_map(*args))


def test_fp8_map_rejects_inconsistent_bits():
    with pytest.raises(ValueError, match="total_bits"):
        codebooks.create_fp8_map(True, 4, 4, 8)


def test_unknown_4bit_type():
    with pytest.raises(NotImplementedError, match="nf5"):
        get_4bit_type("nf5")

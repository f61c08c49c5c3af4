"""Triton blockwise 8-bit kernels against the PyTorch reference: codes and absmax bit for bit."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tritonbits.backends.triton import quant_blockwise as qb
from tritonbits.codebooks import create_dynamic_map, create_linear_map, dynamic_map

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 100 is not a power of two: the kernel pads each block's row of the tile and masks the rest.
BLOCKSIZES = [64, 100, 256, 4096]
SHAPES = [(1,), (63,), (777,), (37, 129), (10000,)]


def _random(shape, dtype, rng, device, scale=3.0):
    return (torch.randn(shape, generator=rng) * scale).to(dtype).to(device)


def _check_quantize(launcher, reference, A, code, blocksize):
    codes, absmax = launcher("quantize_blockwise")(A, code, blocksize)
    ref_codes, ref_absmax = reference("quantize_blockwise")(A, code, blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == A.shape
    assert torch.equal(absmax, ref_absmax)  # exact: max |x| is order-independent
    assert torch.equal(codes, ref_codes)  # exact: same float32 scaling and midpoints
    return codes, absmax


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_dequantize_match_reference(launcher, reference, rng, device, dtype, blocksize, shape):
    A = _random(shape, dtype, rng, device)
    code = dynamic_map(device)
    codes, absmax = _check_quantize(launcher, reference, A, code, blocksize)

    out = launcher("dequantize_blockwise")(codes, absmax, code, blocksize, dtype)
    expected = reference("dequantize_blockwise")(codes, absmax, code, blocksize, dtype)
    assert out.dtype == dtype and out.shape == A.shape
    assert torch.equal(out, expected)  # exact: float32 product, round-to-nearest-even cast


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unsorted_code_with_duplicates(launcher, reference, rng, device, dtype):
    # Any 256-entry code: shuffled, with repeated values (equal midpoints in the search tree).
    code = torch.rand(256, generator=rng) * 2 - 1
    code[10:20] = code[5]
    code = code[torch.randperm(256, generator=rng)].to(device)
    _check_quantize(launcher, reference, _random((3000,), dtype, rng, device), code, 256)


def test_ties_go_to_the_smaller_entry(launcher, reference, device):
    # With a linear code and absmax exactly 1, values equal to a midpoint are exact ties.
    code = create_linear_map(signed=True).to(device)
    sorted_code = code.sort().values
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    A = torch.cat([torch.ones(1, device=device), midpoints, -midpoints]).float()
    codes, _ = _check_quantize(launcher, reference, A, code, 4096)
    assert torch.equal(code[codes[1:256].long()], sorted_code[:-1])


def test_zero_blocks_and_constant_blocks(launcher, reference, rng, device):
    A = _random((1024,), torch.float32, rng, device)
    A[:256] = 0.0  # all-zero block: absmax 0, codes of 0.0 (no NaN)
    A[256:512] = -2.5  # constant block: every value is -absmax
    _check_quantize(launcher, reference, A, dynamic_map(device), 256)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(launcher, reference, rng, device, dtype):
    A = _random((64, 90), dtype, rng, device).t()[:, ::3]  # transposed and strided
    assert not A.is_contiguous()
    _check_quantize(launcher, reference, A, dynamic_map(device), 64)


@pytest.mark.parametrize("shape", [(0,), (3, 0)], ids=str)
def test_empty_input(launcher, device, shape):
    A = torch.empty(shape, device=device)
    codes, absmax = launcher("quantize_blockwise")(A, dynamic_map(device), 64)
    assert codes.shape == shape and codes.dtype == torch.uint8 and absmax.shape == (0,)
    out = launcher("dequantize_blockwise")(codes, absmax, dynamic_map(device), 64, torch.float16)
    assert out.shape == shape and out.dtype == torch.float16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_random_codes(launcher, reference, rng, device, dtype):
    blocksize = 128
    codes = torch.randint(0, 256, (50, 77), generator=rng, dtype=torch.uint8).to(device)
    absmax = (torch.rand(-(codes.numel() // -blocksize), generator=rng) * 10 + 0.1).to(device)
    code = torch.randn(256, generator=rng).to(device)
    out = launcher("dequantize_blockwise")(codes, absmax, code, blocksize, dtype)
    assert torch.equal(out, reference("dequantize_blockwise")(codes, absmax, code, blocksize, dtype))  # exact


def test_very_large_blocksize_falls_back_to_reference(launcher, reference, rng, device, monkeypatch):
    import tritonbits.backends.triton as triton_backend

    monkeypatch.setattr(triton_backend, "_warned", set())
    A = _random((1000,), torch.float32, rng, device)
    with pytest.warns(RuntimeWarning, match="PyTorch reference"):
        codes, absmax = launcher("quantize_blockwise")(A, dynamic_map(device), 32768)
    ref_codes, ref_absmax = reference("quantize_blockwise")(A, dynamic_map(device), 32768)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)


# ---------------------------------------------------------------------------------------------
# The nearest-entry search (tables of quant_blockwise.search_tables), bit for bit against
# torch.bucketize on values chosen to break a wrong search: midpoints and their float neighbors.


def _codes(rng):
    """Named 256-entry codes -> (code, whether its tables must mark a group crowded; None: either)."""
    crowded = torch.linspace(-1, 1, 256)
    crowded[100:200] = 0.3 + torch.arange(100) * 2.0**-22  # 100 entries within 2**-15 of 0.3
    negative_zeros = torch.linspace(-1, 1, 256)
    negative_zeros[120:130] = -0.0
    # 8 exponents, each needing 2**11 cells: more than the tables hold.
    over_budget = torch.cat([2.0**-e * (1 + torch.arange(32) * 2.0**-11) for e in range(1, 9)])
    # Midpoints 2**-14 apart in [0.25, 0.5): 2**11 cells in that group, still not crowded.
    fine_cells = torch.cat([torch.linspace(-1, 1, 253), 0.375 + torch.arange(1, 4) * 2.0**-14])
    return {
        "dynamic_signed": (create_dynamic_map(signed=True), False),
        "dynamic_unsigned": (create_dynamic_map(signed=False), False),
        "linear": (create_linear_map(signed=True), False),
        "unsorted_uniform": (torch.rand(256, generator=rng) * 2 - 1, None),
        "unsorted_normal": (torch.randn(256, generator=rng), None),
        "crowded": (crowded[torch.randperm(256, generator=rng)], True),
        "negative_zeros": (negative_zeros, True),  # equal midpoints, and -0.0 entries
        "tiny": (torch.cat([torch.zeros(1), torch.logspace(-44, 0, 255)]), True),  # subnormals, repeats
        "over_budget": (over_budget, True),
        "fine_cells": (fine_cells[torch.randperm(256, generator=rng)], False),
    }


CODE_NAMES = list(_codes(torch.Generator().manual_seed(0)))


def _midpoints(code):
    sorted_code = code.float().sort(stable=True).values
    return (sorted_code[:-1] + sorted_code[1:]) / 2


def _probes(code, rng):
    """float32 values in [-1 - 2**-23, 1 + 2**-23] and NaN: midpoints, their neighbors, the rest."""
    m = _midpoints(code)
    m = m[m.abs() <= 1]
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    special = [0.0, -0.0, float("nan"), -float("nan"), 1.0, -1.0, 1.0 + 2**-23, -1.0 - 2**-23, 1.0 - 2**-24]
    tiny = torch.tensor([2.0**-149, 2.0**-126, 2.0**-100, 2.0**-24, 2.0**-20, 1e-7, 1e-6, 1e-5])
    # Group and cell edges: powers of two (a group's first key) and the floats just below them
    # (its last key: all mantissa bits set), of both signs.
    powers = torch.tensor([2.0**-e for e in range(150)])
    edges = torch.cat([powers, torch.nextafter(powers, down), -powers, -torch.nextafter(powers, down)])
    # NaNs with other payloads (the kernel passes payloads through): exponent-255 groups.
    nans = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, -0x7FFFFF, 0x7FC00001], dtype=torch.int32).view(torch.float32)
    return torch.cat([
        m, torch.nextafter(m, up), torch.nextafter(m, down), -m, torch.nextafter(-m, up),
        torch.tensor(special), tiny, -tiny, edges, nans, torch.rand(3000, generator=rng) * 2 - 1,
        torch.randn(3000, generator=rng) * 0.05, torch.logspace(-45, 0, 500), -torch.logspace(-45, 0, 500),
    ]).float()  # fmt: skip


@triton.jit
def _rank_kernel(x_ptr, tables_ptr, out_ptr, n, BLOCK: tl.constexpr, SHARED_SEARCH: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
    tl.store(out_ptr + offsets, qb.fitting_rank(x, tables_ptr, SHARED_SEARCH), mask=offsets < n)


def _ranks(x, tables, shared=False):
    out = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    _rank_kernel[(triton.cdiv(x.numel(), 1024),)](x, tables, out, x.numel(), BLOCK=1024, SHARED_SEARCH=shared)
    return out


def _cells(tables):
    """Cells the tables' group entries give out (each group 2**mb from its first cell on)."""
    entries = tables[qb.GROUPS_WORD : qb.GROUPS_WORD + 512].cpu().long()
    return int(((entries >> 16) + (1 << (31 - (entries & 31)))).max())


@pytest.mark.parametrize("shared", [False, True], ids=["global_search", "shared_search"])
@pytest.mark.parametrize("name", CODE_NAMES)
def test_nearest_rank_matches_bucketize(rng, device, name, shared):
    code, crowded = _codes(rng)[name]
    tables = qb.search_tables(code.to(device))
    # The flag says whether the crowded-group path (binary search) runs, so both paths are tested.
    if crowded is not None:
        assert tables[qb.GROUPS_WORD + 512].item() == int(crowded)
    # The shared-memory search runs only where every cell lies in the staged records.
    assert tables[qb.FIT_WORD].item() == int(_cells(tables) <= qb.SHARED_CELLS)
    x = _probes(code, rng)
    expected = torch.bucketize(x, _midpoints(code))  # NaN ranks last (255)
    assert torch.equal(_ranks(x.to(device), tables, shared).cpu().long(), expected)  # exact


def test_dynamic_maps_fit_the_shared_records(device):
    # The codes the optimizers and quantize_blockwise use by default take the shared-memory path;
    # a code with fine cells (2**11 in one group) does not.
    for signed in (True, False):
        tables = qb.search_tables(create_dynamic_map(signed=signed).to(device))
        assert tables[qb.FIT_WORD].item() == 1 and 512 < _cells(tables) <= qb.SHARED_CELLS
    fine = qb.search_tables(_codes(torch.Generator().manual_seed(0))["fine_cells"][0].to(device))
    assert fine[qb.FIT_WORD].item() == 0


@pytest.mark.parametrize("name", CODE_NAMES)
@pytest.mark.parametrize("blocksize", [64, 100, 256, 4096])
def test_quantize_values_at_midpoints(launcher, reference, rng, device, name, blocksize):
    _quantize_midpoint_probes(launcher, reference, rng, device, name, blocksize)


@pytest.mark.parametrize("vec, shared", [(4, False), (None, True), (4, True), (8, True)])
@pytest.mark.parametrize("name", ["dynamic_signed", "dynamic_unsigned", "fine_cells", "crowded"])
@pytest.mark.parametrize("blocksize", [2, 100, 256])
def test_quantize_kernel_options(monkeypatch, launcher, reference, rng, device, name, blocksize, vec, shared):
    # The opt-in layout (VEC elements a thread) and shared-memory search (where the code fits,
    # else the global one), at a block smaller than VEC, a padded one and a whole one.
    monkeypatch.setattr(qb, "_VEC", vec)
    monkeypatch.setattr(qb, "_SHARED_SEARCH", shared)
    _quantize_midpoint_probes(launcher, reference, rng, device, name, blocksize)
    code = _codes(rng)[name][0].to(device)
    for dtype in (torch.float32, torch.bfloat16):  # blocks of their own absmax, a partial last one
        A = _random((5 * blocksize + 3,), torch.float32, rng, device)
        A[blocksize::blocksize] *= 10  # each block's first value its largest: a block must not see the next's
        _check_quantize(launcher, reference, A.to(dtype), code, blocksize)


def _quantize_midpoint_probes(launcher, reference, rng, device, name, blocksize):
    # Every block holds +-1.0, so absmax is 1 and the kernel compares the probe values
    # themselves: exact midpoints (ties), their float neighbors, subnormals, zeros of both signs.
    code, _ = _codes(rng)[name]
    x = _probes(code, rng)
    x = x[~x.isnan() & (x.abs() <= 1)]
    blocks = -(x.numel() // -(blocksize - 1))
    x = torch.nn.functional.pad(x, (0, blocks * (blocksize - 1) - x.numel()))
    ones = torch.where(torch.rand(blocks, 1, generator=rng) < 0.5, 1.0, -1.0)
    A = torch.cat([ones, x.view(blocks, blocksize - 1)], dim=1).reshape(-1)
    A = A[: A.numel() - blocksize // 3]  # a partial last block
    _check_quantize(launcher, reference, A.to(device), code.to(device), blocksize)


def test_quantize_nan_blocks(launcher, reference, rng, device):
    # A NaN makes its block's absmax NaN and all its codes 255, as in the reference.
    A = _random((1024,), torch.float32, rng, device)
    A[5] = float("nan")
    A[700] = -float("nan")
    codes, absmax = launcher("quantize_blockwise")(A, dynamic_map(device), 256)
    ref_codes, ref_absmax = reference("quantize_blockwise")(A, dynamic_map(device), 256)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax.isnan(), ref_absmax.isnan()) and absmax.isnan().tolist() == [True, False, True, False]
    assert torch.equal(absmax.nan_to_num(), ref_absmax.nan_to_num())  # exact elsewhere


def test_search_tables_cache(rng, device):
    qb.clear_search_tables()
    code = torch.randn(256, generator=rng).to(device)
    first = qb.cached_search_tables(code, torch.device(device))
    assert qb.cached_search_tables(code, torch.device(device)) is first
    code.mul_(2)  # modified in place: the tables are rebuilt
    rebuilt = qb.cached_search_tables(code, torch.device(device))
    assert rebuilt is not first and torch.equal(rebuilt, qb.search_tables(code))
    qb.clear_search_tables()
    assert qb.cached_search_tables(code, torch.device(device)) is not rebuilt

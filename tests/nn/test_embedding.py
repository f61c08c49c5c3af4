"""Embedding and StableEmbedding: lookups against bitsandbytes, init, and 32-bit optimizer state."""

from __future__ import annotations

import pytest
import torch

import tritonbits.optim as optim
from tritonbits.nn.embedding import Embedding, StableEmbedding
from tritonbits.optim import GlobalOptimManager

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (num_embeddings, embedding_dim, index shape): odd sizes, 0-d, 2-D and empty index tensors.
SHAPES = [(1, 7, (3,)), (37, 33, (2, 5)), (64, 16, ()), (10, 8, (0,))]


@pytest.fixture(autouse=True)
def _restore_optim_manager():
    """These layers register overrides with the process-wide GlobalOptimManager, and a step records
    them by (group, index) position, as in bitsandbytes: restore its tables so that later tests'
    optimizers do not inherit a 32-bit override for their first parameter."""
    manager = GlobalOptimManager.get_instance()
    saved = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
             for k, v in vars(manager).items()}
    yield
    vars(manager).clear()
    vars(manager).update(saved)


def _pair(ours_cls, theirs_cls, rng, n, d, dtype, **kwargs):
    weight = (torch.randn(n, d, generator=rng) * 3).to(dtype)
    ours, theirs = ours_cls(n, d, **kwargs), theirs_cls(n, d, **kwargs)
    for module in (ours, theirs):
        module.weight.data = weight.clone()  # only the table in dtype: the norm stays float32
    return ours, theirs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,index_shape", SHAPES)
def test_embedding_matches_bitsandbytes(rng, bnb_ref, dtype, n, d, index_shape):
    ours, theirs = _pair(Embedding, bnb_ref.nn.Embedding, rng, n, d, dtype)
    index = torch.randint(0, n, index_shape, generator=rng)
    out = ours(index)
    assert out.shape == (*index_shape, d) and out.dtype == dtype
    assert torch.equal(out, theirs(index))  # a plain lookup: exact
    assert torch.equal(out, ours.weight[index])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,index_shape", SHAPES)
def test_stable_embedding_matches_bitsandbytes(rng, bnb_ref, dtype, n, d, index_shape):
    ours, theirs = _pair(StableEmbedding, bnb_ref.nn.StableEmbedding, rng, n, d, dtype)
    # A non-trivial norm: the LayerNorm's affine parameters must be used, not just present.
    gamma, beta = torch.rand(d, generator=rng) + 0.5, torch.randn(d, generator=rng)
    for module in (ours, theirs):
        module.norm.weight.data.copy_(gamma)
        module.norm.bias.data.copy_(beta)
    index = torch.randint(0, n, index_shape, generator=rng)
    out = ours(index)
    assert out.shape == (*index_shape, d) and out.dtype == dtype
    assert ours.norm.weight.dtype == torch.float32  # normalization in full precision
    assert torch.equal(out, theirs(index))  # same operations in the same order: exact

    rows = ours.weight[index].double()
    mean, var = rows.mean(-1, keepdim=True), rows.var(-1, unbiased=False, keepdim=True)
    expected = (rows - mean) / torch.sqrt(var + 1e-5) * gamma.double() + beta.double()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]  # one rounding to dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 4)


def test_stable_embedding_gradients_match_bitsandbytes(rng, bnb_ref):
    ours, theirs = _pair(StableEmbedding, bnb_ref.nn.StableEmbedding, rng, 29, 12, torch.float32, padding_idx=3)
    index = torch.randint(0, 29, (4, 6), generator=rng)
    index[0, 0] = 3
    upstream = torch.randn(4, 6, 12, generator=rng)
    for module in (ours, theirs):
        (module(index) * upstream).sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=0, atol=0)  # same graph: exact
    assert torch.count_nonzero(ours.weight.grad[3]) == 0  # padding row gets no gradient
    torch.testing.assert_close(ours.norm.weight.grad, theirs.norm.weight.grad, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [Embedding, StableEmbedding])
def test_init_is_xavier_with_zero_padding_row(cls):
    torch.manual_seed(0)
    n, d = 300, 40
    module = cls(n, d, padding_idx=7)
    bound = (6.0 / (n + d)) ** 0.5  # xavier_uniform_ bound for a (n, d) matrix
    assert module.weight.abs().max() <= bound
    assert module.weight.abs().max() > 0.9 * bound  # 12,000 uniform draws reach the edge
    assert torch.count_nonzero(module.weight[7]) == 0


def test_dtype_and_device_arguments():
    # StableEmbedding takes dtype (bitsandbytes' own fails on it: see compat.DEVIATIONS); Embedding
    # takes none, as in bitsandbytes. The LayerNorm stays float32 either way.
    assert StableEmbedding(5, 3, dtype=torch.float64).norm.weight.dtype == torch.float32
    assert StableEmbedding(5, 3, device="cpu", dtype=torch.float64).weight.dtype == torch.float64
    with pytest.raises(TypeError):
        Embedding(5, 3, dtype=torch.float64)


@pytest.mark.parametrize("cls", [Embedding, StableEmbedding])
def test_weight_keeps_32bit_state_under_8bit_optimizer(rng, cls):
    """The embedding weight gets float32 state, an equally large Linear gets uint8 codes."""
    emb = cls(128, 64)  # 8192 elements: above min_8bit_size, so 8-bit unless overridden
    lin = torch.nn.Linear(64, 128, bias=False)
    model = torch.nn.ModuleDict({"emb": emb, "lin": lin})
    opt = optim.Adam8bit(model.parameters(), lr=1e-3)
    index = torch.randint(0, 128, (5, 9), generator=rng)
    lin(emb(index).float()).square().mean().backward()
    opt.step()
    assert opt.state[emb.weight]["state1"].dtype == torch.float32
    assert opt.state[emb.weight]["state2"].dtype == torch.float32
    assert opt.state[lin.weight]["state1"].dtype == torch.uint8

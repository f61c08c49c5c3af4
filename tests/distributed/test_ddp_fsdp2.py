"""DDP and FSDP2 (``fully_shard``) with 4-bit QLoRA layers and 8-bit optimizers on 2 ranks.

Always on the CPU with gloo; also on 2 GPUs with NCCL where there are 2 or more.

Each scenario starts two processes running ``ranks.py`` with torchrun's environment variables
on 127.0.0.1 and a free port (bounded by a timeout); every rank saves what it saw to a file and
the tests below compare the files. The model: two Linear4bit layers (NF4, double-quantized,
packed into ``quant_storage`` words, frozen with their biases) with trainable float32 LoRA
adapters; shapes are chosen so that some FSDP2 shards are uneven (see ``ranks.py``).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this build", allow_module_level=True)

RANKS_SCRIPT = Path(__file__).with_name("ranks.py")
WORLD_SIZE = 2
TIMEOUT_S = 150  # per scenario; each takes ~10-20 s on 2 CPU cores


def _load_ranks_module():
    spec = importlib.util.spec_from_file_location("tritonbits_test_ranks", RANKS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ranks = _load_ranks_module()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(scenario: str, outdir: Path, device: str) -> list[dict]:
    """Run ``ranks.py scenario outdir`` on WORLD_SIZE local ranks; the ranks' result dicts."""
    _run_ranks([str(RANKS_SCRIPT), scenario, str(outdir)], outdir, scenario, TRITONBITS_DIST_DEVICE=device)
    return [torch.load(outdir / f"{scenario}_rank{rank}.pt", map_location="cpu", weights_only=False)
            for rank in range(WORLD_SIZE)]  # fmt: skip


def _run_ranks(argv: list[str], outdir: Path, name: str, **extra_env: str) -> list[str]:
    """Run ``python argv`` as WORLD_SIZE ranks (torchrun's variables); their logs, or fail with them."""
    port = _free_port()
    repo_root = str(Path(__file__).resolve().parents[2])
    processes = []
    for rank in range(WORLD_SIZE):
        env = dict(
            os.environ,
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])), **extra_env,
        )  # fmt: skip
        log = open(outdir / f"{name}_rank{rank}.log", "w")
        processes.append((subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT),
                          log))  # fmt: skip
    failed = []
    for rank, (process, log) in enumerate(processes):
        try:
            code = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = "timeout"
        log.close()
        if code != 0:
            failed.append((rank, code))
    if failed:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        tails = "\n".join(
            f"--- rank {rank} (exit {code}) ---\n" + (outdir / f"{name}_rank{rank}.log").read_text()[-3000:]
            for rank, code in failed
        )
        pytest.fail(f"{name} ranks failed:\n{tails}")
    return [(outdir / f"{name}_rank{rank}.log").read_text() for rank in range(WORLD_SIZE)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes: bit-identical means equal bytes (packed 4-bit words can be NaN patterns)."""
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


# gloo on the CPU always; NCCL where there are 2 GPUs (the example picks the same way)
DIST_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else [])


@pytest.fixture(scope="module", params=DIST_DEVICES)
def ddp_results(request, tmp_path_factory) -> list[dict]:
    return _launch("ddp", tmp_path_factory.mktemp(f"ddp_{request.param}"), request.param)


@pytest.fixture(scope="module", params=DIST_DEVICES)
def fsdp2_results(request, tmp_path_factory) -> list[dict]:
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (fails clearly on a torch without FSDP2)

    return _launch("fsdp2", tmp_path_factory.mktemp(f"fsdp2_{request.param}"), request.param)


# -- DDP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ranks.DDP_OPTIMIZERS))
def test_ddp_ranks_stay_bit_identical(ddp_results, name):
    rank0, rank1 = ddp_results
    prefixes = (f"{name}/param/", f"{name}/state/")
    keys = [key for key in rank0 if key.startswith(prefixes)]
    assert keys and sorted(keys) == sorted(key for key in rank1 if key.startswith(prefixes))
    different = [key for key in keys if not _same_bits(rank0[key], rank1[key])]
    assert not different, f"{name}: ranks differ in {different}"
    # the ranks saw different data, so equal parameters come from DDP's gradient averaging
    assert not torch.equal(rank0[f"{name}/losses"], rank1[f"{name}/losses"])


@pytest.mark.parametrize("name", list(ranks.DDP_OPTIMIZERS))
def test_ddp_trains_adapters_only(ddp_results, name):
    rank0 = ddp_results[0]
    initial = ranks.build_model(torch.bfloat16, seed=0, adapter_seed=100).state_dict()  # rank 0's model
    for key, value in initial.items():
        trained = rank0[f"{name}/param/{key}"]
        if "lora_" in key:
            assert not torch.equal(trained, value), f"{name}: adapter {key} did not move"
        else:
            assert _same_bits(trained, value), f"{name}: frozen {key} changed"
    if "8bit" in name and name not in ("LAMB8bit", "LARS8bit"):  # LAMB/LARS keep 32-bit state
        state1 = [v for k, v in rank0.items() if k.startswith(f"{name}/state/") and k.endswith(".state1")]
        assert state1 and all(v.dtype == torch.uint8 for v in state1)


# -- FSDP2 ---------------------------------------------------------------------------------

STORAGES = ["bfloat16", "float32"]


@pytest.mark.parametrize("storage", STORAGES)
def test_fsdp2_shards_the_packed_weight(fsdp2_results, storage):
    for rank_results in fsdp2_results:
        kinds = {name: rest for name, *rest in rank_results[f"{storage}/param_types"]}
        assert set(kinds) == {f"{i}.{n}" for i in (0, 2) for n in ("lora_A", "lora_B", "base.weight", "base.bias")}
        for name, (kind, dtype, requires_grad, _) in kinds.items():
            assert kind == "DTensor", name
            assert requires_grad == ("lora_" in name), name
            if name.endswith("base.weight"):
                assert dtype == f"torch.{storage}"
    # the 4-bit weights' words split over the ranks: 64 * 65 / 2 bytes and 65 * 40 / 2 bytes
    words = {"bfloat16": (1040, 650), "float32": (520, 325)}[storage]
    local_shapes = [{name: shape for name, *_, shape in r[f"{storage}/param_types"]} for r in fsdp2_results]
    assert [sum(shapes[f"{i}.base.weight"][0] for shapes in local_shapes) for i in (0, 2)] == list(words)


@pytest.mark.parametrize("storage", STORAGES)
def test_fsdp2_forward_matches_unsharded(fsdp2_results, storage):
    for rank_results in fsdp2_results:
        # exact: the all-gathered words are the same bytes and the matmuls the same shapes
        assert torch.equal(rank_results[f"{storage}/forward_sharded"], rank_results[f"{storage}/forward_unsharded"])


@pytest.mark.parametrize("storage", STORAGES)
def test_fsdp2_trains_with_8bit_state_on_shards(fsdp2_results, storage):
    for rank_results in fsdp2_results:
        assert rank_results[f"{storage}/state_dtypes"] == ["torch.uint8"]
        before, after = rank_results[f"{storage}/eval_loss_before"], rank_results[f"{storage}/eval_loss_after"]
        assert after < 0.8 * before, (before, after)  # held-out loss after 6 steps of lr 1e-2
    assert fsdp2_results[0][f"{storage}/eval_loss_after"] == fsdp2_results[1][f"{storage}/eval_loss_after"]


@pytest.mark.parametrize("storage", STORAGES)
def test_fsdp2_sharded_checkpoint_resumes_identically(fsdp2_results, storage):
    for rank_results in fsdp2_results:
        losses, resumed = rank_results[f"{storage}/losses"], rank_results[f"{storage}/resumed_losses"]
        assert torch.equal(resumed, losses[ranks.RESUME_AT :]), (losses, resumed)
        final, resumed_final = rank_results[f"{storage}/final_local"], rank_results[f"{storage}/resumed_final_local"]
        assert final.keys() == resumed_final.keys()
        different = [key for key in final if not _same_bits(final[key], resumed_final[key])]
        assert not different, different


@pytest.mark.parametrize("storage", STORAGES)
def test_fsdp2_full_state_dict_reloads_unsharded(fsdp2_results, storage):
    rank0 = fsdp2_results[0]
    keys = rank0[f"{storage}/full_keys"]
    for layer in (0, 2):
        for key in ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                    "weight.quant_state.bitsandbytes__nf4", "lora_A", "lora_B"):  # fmt: skip
            full_key = f"{layer}.{key}" if key.startswith("lora") else f"{layer}.base.{key}"
            assert full_key in keys
    # exact: the reloaded model holds the same bytes and computes the same ops
    assert torch.equal(rank0[f"{storage}/forward_trained_reloaded"], rank0[f"{storage}/forward_trained_sharded"])


# -- the example ---------------------------------------------------------------------------


def test_example_qlora_distributed_runs_fsdp2(tmp_path):
    script = Path(__file__).resolve().parents[2] / "examples" / "qlora_distributed.py"
    argv = [str(script), "--mode", "fsdp", "--steps", "12", "--dim", "32", "--vocab", "32", "--seq-len", "16",
            "--layers", "1", "--lora-r", "4", "--log-every", "11", "--lr", "1e-2", "--save", str(tmp_path)]  # fmt: skip
    # the example takes GPU LOCAL_RANK whenever CUDA is there: hide a single GPU
    hide = {} if "cuda" in DIST_DEVICES else {"CUDA_VISIBLE_DEVICES": ""}
    log = _run_ranks(argv, tmp_path, "example", **hide)[0]
    losses = [float(line.split()[3]) for line in log.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and losses[1] < losses[0], log  # steps 0 and 11: the loss falls
    step_lines = [line for line in log.splitlines() if line.startswith("step")]
    assert step_lines[-1].endswith("tokens/s"), log
    adapters = torch.load(tmp_path / "adapters.pt")
    assert adapters and all("lora_" in key for key in adapters)
    assert adapters["blocks.0.up.lora_A"].shape == (4, 32)  # gathered to the full shape
    assert (tmp_path / "checkpoint" / ".metadata").exists()

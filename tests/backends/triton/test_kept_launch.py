"""KeptLaunch: the first call goes through Triton's launch, later ones through the compiled kernel's
launcher with a three-dimensional grid, and a call specialized differently takes the full launch."""

from __future__ import annotations


class _Compiled:
    """Stands in for triton's CompiledKernel: ``compiled[grid](*args)`` records the launch."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        assert len(grid) == 3, "the compiled kernel's launcher indexes grid[0], grid[1] and grid[2]"
        return lambda *args: self.log.append(("compiled", grid, args))


class _Kernel:
    """Stands in for a @triton.jit function: ``kernel[grid](*args, **constexprs)`` launches in full."""

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, num_warps, **constexprs):
            self.log.append(("full", grid, args, constexprs, num_warps))
            return _Compiled(self.log)

        return launch


def test_runner_after_the_first_launch_and_full_launch_on_other_specializations(monkeypatch):
    from tritonbits.backends.triton import kept_launch

    monkeypatch.setattr(kept_launch, "interpreting", lambda: False)
    kernel = _Kernel()
    launch = kept_launch.KeptLaunch(kernel, (7,), {"BLOCK": 64, "FLAG": True}, num_warps=4)
    assert launch.grid == (7, 1, 1)
    launch._run((1, 2), spec=("aligned",))
    launch._run((3, 4), spec=("aligned",))
    launch._run((5, 6), spec=("misaligned",))
    assert kernel.log == [
        ("full", (7, 1, 1), (1, 2), {"BLOCK": 64, "FLAG": True}, 4),
        ("compiled", (7, 1, 1), (3, 4, 64, True)),  # constexprs follow the arguments, in order
        ("full", (7, 1, 1), (5, 6), {"BLOCK": 64, "FLAG": True}, 4),
    ]


def test_no_runner_under_the_interpreter(monkeypatch):
    from tritonbits.backends.triton import kept_launch

    monkeypatch.setattr(kept_launch, "interpreting", lambda: True)
    kernel = _Kernel()
    launch = kept_launch.KeptLaunch(kernel, (2, 3), {}, num_warps=1)
    launch._run(())
    launch._run(())
    assert [entry[0] for entry in kernel.log] == ["full", "full"]

"""Streaming of paged optimizer state between pinned host memory and the GPU, overlapped.

A paged optimizer keeps each large state tensor in pinned host memory (``Optimizer8bit.
get_state_buffer``). For one step over parameters p_0, p_1, ... a :class:`StatePager` copies the
states of p_{i+1} in (on a copy-in stream) and those of p_{i-1} back out (on a copy-out stream)
while p_i is updated on the current stream. PCIe carries both directions at once, so a step costs
about one transfer of the state bytes per direction instead of their sum plus the updates, and the
GPU holds the states of at most three parameters beyond the model.

Ordering: an update waits for its parameter's copy-in (an event); a copy-out waits for the update
(an event) and then rewrites the host buffer, which that step's copy-in had already read. The
device copies are allocated on the copy-in stream and marked used by the streams that read them
(``record_stream``), so the caching allocator reuses their memory only after the copy-out.
:meth:`StatePager.finish` waits for the last copy-out, so host readers (``state_dict``, the next
step) see the updated states.
"""

from __future__ import annotations

import torch

__all__ = ["PAGED_KEYS", "StatePager"]

PAGED_KEYS = ("state1", "state2")


def paged_states(state: dict) -> list[tuple[str, torch.Tensor]]:
    """(key, pinned host tensor) of the paged state tensors held in one parameter's ``state``."""
    return [(k, state[k]) for k in PAGED_KEYS if getattr(state.get(k), "is_paged", False)]


class StatePager:
    """Copies in, swaps and copies out the paged states of one step's parameters (CUDA only).

    Use: :meth:`fetch` a parameter's states (starting the next one's copy-in with ``ahead``), run
    its update, :meth:`evict` them, and :meth:`finish` once after the last parameter.
    """

    def __init__(self, states: dict):
        self.states = states  # the optimizer's per-parameter state (parameter -> dict)
        self.streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self.incoming: dict[int, tuple[torch.cuda.Event, list]] = {}  # id(p) -> (event, [(key, host, device)])
        self.used: set[torch.device] = set()

    def _streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self.streams:
            self.streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self.streams[device]

    def _copy_in(self, p) -> None:
        state = self.states[p]
        pages = paged_states(state)
        if not pages or id(p) in self.incoming:
            return
        device = pages[0][1].page_device
        copy_in, _ = self._streams(device)
        copies = []
        with torch.cuda.stream(copy_in):
            for key, host in pages:
                copies.append((key, host, host.to(device, non_blocking=True)))
            done = torch.cuda.Event()
            done.record(copy_in)
        self.incoming[id(p)] = (done, copies)

    def fetch(self, p, ahead=None) -> None:
        """Put ``p``'s device states in its state dict (the update runs on the current stream
        after their copy-in) and start the copy-in of parameter ``ahead``, if given."""
        self._copy_in(p)
        if ahead is not None:
            self._copy_in(ahead)
        entry = self.incoming.get(id(p))
        if entry is None:
            return
        done, copies = entry
        current = torch.cuda.current_stream(copies[0][2].device)
        current.wait_event(done)
        state = self.states[p]
        for key, host, device_copy in copies:
            device_copy.record_stream(current)
            state[key] = device_copy

    def evict(self, p) -> None:
        """Queue the copy-out of ``p``'s updated states after its update and put the host buffers back."""
        entry = self.incoming.pop(id(p), None)
        if entry is None:
            return
        _, copies = entry
        device = copies[0][2].device
        _, copy_out = self._streams(device)
        updated = torch.cuda.Event()
        updated.record(torch.cuda.current_stream(device))
        copy_out.wait_event(updated)
        state = self.states[p]
        with torch.cuda.stream(copy_out):
            for key, host, device_copy in copies:
                host.copy_(device_copy, non_blocking=True)
                device_copy.record_stream(copy_out)
                state[key] = host
        self.used.add(device)

    def finish(self) -> None:
        """Wait for every copy-out (host memory is then current)."""
        for key in list(self.incoming):  # fetched ahead but not updated (no such case in step)
            self.incoming.pop(key)[0].synchronize()
        for device in self.used:
            self.streams[device][1].synchronize()
        self.used.clear()

"""seqgen.threads: one thread of a server gets torch's cores, every other thread one."""
import threading

import pytest
import torch

from seqgen.threads import serial_except, use_threads_here


def _threads_in_new_thread() -> int:
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_serial_except_gives_the_started_thread_n_and_every_other_thread_one():
    before = torch.get_num_threads()
    seen, go, stop = {}, threading.Event(), threading.Event()

    def start(on_start):
        def work():
            on_start()
            go.set()
            stop.wait(10)
            seen["worker, after the others ran"] = torch.get_num_threads()
        t = threading.Thread(target=work)
        t.start()
        go.wait(10)
        return t

    try:
        worker = serial_except(start, 3)
        seen["caller"] = torch.get_num_threads()
        seen["a thread started later"] = _threads_in_new_thread()
        stop.set()
        worker.join(10)
        assert seen == {"caller": 1, "a thread started later": 1, "worker, after the others ran": 3}
    finally:
        use_threads_here(before)


def test_use_threads_here_refuses_zero():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        use_threads_here(0)

"""The places of a method model's active requests, shared by its processes (triton_models/places.py)."""

from __future__ import annotations

import subprocess
import sys
import threading

from ti2i.triton_models.places import ProcessPlaces, SharedPlaces


def test_places_held_by_another_process_count_against_the_model(tmp_path):
    """Three places; another process holds two: this one gets the third at once, and a fourth request waits
    (and says so) until the other process lets go."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys\n"
        "from pathlib import Path\n"
        "from ti2i.triton_models.places import SharedPlaces\n"
        f"places = SharedPlaces(Path({str(tmp_path)!r}), 3)\n"
        "held = [places.acquire(), places.acquire()]\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        places = SharedPlaces(tmp_path, 3)
        waited = []
        first = places.acquire(on_wait=lambda: waited.append("first"))
        assert waited == []
        got = threading.Event()

        def second() -> None:
            places.acquire(on_wait=lambda: waited.append("second"))
            got.set()

        threading.Thread(target=second, daemon=True).start()
        assert not got.wait(0.5) and waited == ["second"]
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert got.wait(30), "the place the other process let go never came free"
        places.release(first)
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_process_leaves_its_places_free(tmp_path):
    subprocess.run([sys.executable, "-c", (
        "import os\n"
        "from pathlib import Path\n"
        "from ti2i.triton_models.places import SharedPlaces\n"
        f"places = SharedPlaces(Path({str(tmp_path)!r}), 1)\n"
        "places.acquire()\n"
        "os._exit(1)\n")], check=False)
    places = SharedPlaces(tmp_path, 1)
    waited = []
    places.release(places.acquire(on_wait=lambda: waited.append(1)))
    assert waited == []


def test_process_places_wait_for_a_release():
    places = ProcessPlaces(1)
    token = places.acquire()
    got = threading.Event()
    waited = []
    threading.Thread(target=lambda: (places.acquire(on_wait=lambda: waited.append(1)), got.set()), daemon=True).start()
    assert not got.wait(0.3) and waited == [1]
    places.release(token)
    assert got.wait(10)

"""Profiling aid (not a test): run a Python script with cProfile on every thread, timed by each
thread's own CPU clock, and write the merged profile as text when the script exits.

Why: the server's work runs on its event-loop thread and its pool threads, which cProfile's usual
entry point (main thread, wall clock) does not see; py-spy and yappi are not installed here.
The profiler inflates Python-heavy code, so read shares, not absolute times.

Usage:  python bench/cprofile_threads.py OUT.txt SCRIPT.py [script arguments...]
        (bench_server.py --profile-server OUT.txt runs asps_server.py this way)
"""

from __future__ import annotations

import atexit
import cProfile
import io
import pstats
import runpy
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    out, script = Path(sys.argv[1]), sys.argv[2]
    sys.argv = sys.argv[2:]
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_in_thread(frame, event, arg):  # type: ignore[no-untyped-def]
        profile = cProfile.Profile(time.thread_time)
        with lock:
            profiles.append(profile)
        sys.setprofile(None)
        profile.enable()

    def dump() -> None:
        merged = None
        for profile in profiles:
            profile.create_stats()
            if profile.stats:  # type: ignore[attr-defined]
                merged = pstats.Stats(profile) if merged is None else merged.add(profile)
        if merged is None:
            return
        text = io.StringIO()
        merged.stream = text  # type: ignore[attr-defined]
        merged.sort_stats("cumulative").print_stats(80)
        merged.sort_stats("tottime").print_stats(40)
        out.write_text(text.getvalue())
        merged.dump_stats(str(out) + ".pstats")  # raw, for callers/callees: python -m pstats OUT.pstats

    threading.setprofile(start_in_thread)
    atexit.register(dump)
    sys.path.insert(0, str(Path(script).resolve().parent))
    main_profile = cProfile.Profile(time.thread_time)
    profiles.append(main_profile)
    main_profile.enable()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

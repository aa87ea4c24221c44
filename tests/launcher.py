"""Run the stage scripts as forks of one process that has imported torch and transformers once.

A plain `python train_sft.py ...` spends most of a tiny run importing (5-15 s on a busy 2-core box),
and the resume tests need a dozen runs. So a server process imports the scripts' modules once, then
forks a child per run; the child runs the script as `__main__` with its own argv and stderr, as
`python script.py ...` would after the imports (test_cli_errors.py checks that the two agree). The
test gets each child's pid, so it can poll its output dir and SIGKILL or SIGINT it like any process.
"""

import json
import os
import runpy
import subprocess
import sys
import threading
import time

from conftest import ROOT

from nanorlhf.ablate import run_command as fresh_run_command

SCRIPTS = ["train_sft.py", "train_rm.py", "train_dpo.py", "train_ppo.py"]


class Launcher:
    """Client: start(script, args) -> pid; wait() -> exit status (negative: killed by that signal)."""

    def __init__(self, stderr_dir):
        # One thread: the runs are tiny, and on a busy 2-core box two OpenMP threads per run spin
        # against each other and against everything else (a tiny PPO run took 90 s instead of 5).
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        self.server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], cwd=ROOT,
                                       env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.stderr_dir, self.n, self.lock = stderr_dir, 0, threading.Lock()

    def start(self, script, *args, log=None):
        """log: a file for stdout and stderr both (as nanorlhf.ablate's logs), instead of stderr alone."""
        self.n += 1
        self.stderr_path = log or os.path.join(self.stderr_dir, f"run{self.n}.stderr")
        self.server.stdin.write(json.dumps([script, [str(a) for a in args], self.stderr_path, bool(log)]) + "\n")
        self.server.stdin.flush()
        return int(self.server.stdout.readline())

    def wait(self):
        """(exit status of the last run started, its stderr)."""
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError("the launcher died")
        with open(self.stderr_path, encoding="utf-8") as f:
            return int(line), f.read()

    def run(self, script, *args, log=None):
        self.start(script, *args, log=log)
        return self.wait()

    def run_command(self, argv, log):
        """nanorlhf.ablate.run_command's work, forked: [python, ROOT/script.py or -m module, args...] with its
        output in the open file `log`; its exit status. Other code (a patched copy's) runs as a fresh interpreter,
        since the imported modules here are the checkout's."""
        if argv[1] == "-m":
            script, args = f"-m {argv[2]}", argv[3:]
        elif os.path.dirname(os.path.abspath(argv[1])) == ROOT:
            script, args = os.path.basename(argv[1]), argv[2:]
        else:
            return fresh_run_command(argv, log)
        with self.lock:  # one run at a time (ablate --jobs calls from threads)
            return self.run(script, *args, log=log.name)[0]

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=60)


def wait_for(path, timeout=300):
    """Poll until `path` exists (a checkpoint appears as a whole, by rename)."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)


def serve():
    from conftest import run_as_main

    for script in SCRIPTS:
        runpy.run_path(os.path.join(ROOT, script), run_name="imports_only")  # its imports, not main()
    for line in sys.stdin:
        script, args, stderr_path, stdout_too = json.loads(line)
        sys.stdout.flush()  # nothing buffered may be copied into the child
        pid = os.fork()
        if pid == 0:
            run_as_main(script, args, stderr_path, stdout_too)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve()

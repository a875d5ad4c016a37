"""Progress people can watch: on a terminal, a live bar over a run's epochs (epoch k/n, the last
validation accuracy, the time left in the session's budget); elsewhere (CI, a log file) nothing
extra, only the plain lines the commands print after each epoch or trial.
"""

from __future__ import annotations

import sys
import time


def clock(seconds: float) -> str:
    """Seconds as minutes and seconds, e.g. 6m56s: how every duration is shown."""
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def on_terminal(stream=None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()


class EpochBar:
    """A tqdm bar over one run's epochs; closed (and cleared) when the run ends."""

    def __init__(self, total: int, *, description: str, deadline: float | None = None, position: int = 0,
                 stream=None):
        from tqdm import tqdm

        self.deadline = deadline  # time.time() at which the session's budget runs out, if it has one
        self.bar = tqdm(total=total, desc=description, unit="epoch", position=position, leave=False,
                        file=stream or sys.stdout, dynamic_ncols=True)

    def update(self, epoch: int, val_accuracy: float) -> None:
        postfix = {"val": f"{val_accuracy:.4f}"}
        if self.deadline is not None:
            postfix["budget left"] = clock(max(0.0, self.deadline - time.time()))
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(epoch - self.bar.n)

    def write(self, line: str) -> None:
        """A line above the bar, which stays at the bottom."""
        self.bar.write(line, file=self.bar.fp)

    def close(self) -> None:
        self.bar.close()


class NoBar:
    """Not a terminal: no bar; lines are printed as they come."""

    def __init__(self, stream=None):
        self.stream = stream

    def update(self, epoch, val_accuracy):
        pass

    def write(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def close(self):
        pass


def epoch_bar(total: int, *, description: str, deadline: float | None = None, position: int = 0, stream=None):
    """A live bar when ``stream`` (stdout by default) is a terminal, else one that draws nothing."""
    if not on_terminal(stream):
        return NoBar(stream)
    return EpochBar(total, description=description, deadline=deadline, position=position, stream=stream)

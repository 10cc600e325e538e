"""Switching a model config's attention implementation safely while other threads use the model.

A joint pass (``fedsea.model.joint``) runs the blocks with its own attention function, which
transformers' attention modules look up by name in ``config._attn_implementation`` at every
call; the mask builders read the same name. The config is one object shared by every part and
every view of a model, so while a joint pass has switched it, an ordinary forward of the same
model in another thread (a client's lone head call beside a joint tail pass, another client's
split over the same weights, an in-process trunk) would build the wrong mask and call the joint
attention. transformers has no per-call or per-thread override of the implementation, hence
this readers-writer rule per config:
- an ordinary forward (``SplitPart._run_blocks``) is a reader: any number run at once, none
  while the config is switched;
- a joint pass is the writer: it waits for the running readers to finish, switches, runs, and
  switches back before any reader starts.

Uncontended (a server's one compute thread, a lone client) it costs two lock round trips per
forward, microseconds against milliseconds. Waiting writers go before new readers, so a steady
stream of ordinary forwards cannot starve a joint pass.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _Switch:
    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.readers = 0
        self.writing = False
        self.waiting_writers = 0


# id(config) -> its switch; a config's entry goes when the config is collected. (Configs define
# ``__eq__`` and so are unhashable: a WeakKeyDictionary cannot hold them.)
_SWITCHES: dict[int, _Switch] = {}
_LOCK = threading.Lock()


def _switch(config: Any) -> _Switch:
    key = id(config)
    with _LOCK:
        found = _SWITCHES.get(key)
        if found is None:
            found = _SWITCHES[key] = _Switch()
            weakref.finalize(config, _SWITCHES.pop, key, None)
        return found


@contextmanager
def ordinary_forward(config: Any) -> Iterator[None]:
    """A forward that uses ``config`` as it is: waits while a joint pass has it switched."""
    switch = _switch(config)
    entered = False
    try:
        with switch.cv:
            while switch.writing or switch.waiting_writers:
                switch.cv.wait()
            switch.readers += 1
            entered = True
        yield
    finally:
        if entered:  # (interrupted while waiting: nothing to undo)
            with switch.cv:
                switch.readers -= 1
                if switch.readers == 0:
                    switch.cv.notify_all()


@contextmanager
def switched_attention(config: Any, name: str) -> Iterator[str | None]:
    """Make ``name`` the config's attention implementation for the block, no ordinary forward
    running meanwhile; yields the implementation it replaced."""
    switch = _switch(config)
    with switch.cv:
        switch.waiting_writers += 1
        try:
            while switch.writing or switch.readers:
                switch.cv.wait()
        finally:  # interrupted too: readers must not wait for a writer that has gone
            switch.waiting_writers -= 1
            switch.cv.notify_all()
        switch.writing = True
    before = config._attn_implementation
    try:
        config._attn_implementation = name
        yield before
    finally:
        config._attn_implementation = before
        with switch.cv:
            switch.writing = False
            switch.cv.notify_all()

"""One ``predict`` or ``explain`` at a time per model.

Both hook into the model while they run (explainers record every forward's attentions and
activations; an explanation of a half-precision model runs on a float32 working copy), so two
threads sharing a model would read each other's records. Calls from other threads wait their
turn; a call from inside a running one on the same thread (a target or hook that predicts) is
refused, since it would feed the running explanation's records. Calling the model itself
(``model(images=..., text=...)``) from another thread is not covered: do it between calls.
"""
import contextlib
import threading
import weakref

from .errors import ModelBusyError

_guard = threading.Lock()
_slots = weakref.WeakKeyDictionary()  # the detector → its _Slot


class _Slot:
    def __init__(self):
        self.lock = threading.Lock()
        self.owner = None  # thread id of the running call
        self.what = None


def _slot(model):
    key = getattr(model, "detr", model)  # a PhraseCut wrapper shares its detector's lock
    with _guard:
        slot = _slots.get(key)
        if slot is None:
            slot = _slots[key] = _Slot()
        return slot


@contextlib.contextmanager
def one_at_a_time(model, what):
    """Hold ``model`` for the call ``what`` ("predict", "explain"); other threads wait."""
    slot = _slot(model)
    me = threading.get_ident()
    if slot.owner == me:
        raise ModelBusyError(f"{what} was called on a model that this thread is already running "
                             f"{slot.what} on (from a target, hook or callback); call it after "
                             f"{slot.what} returns, or on a copy of the model (copy.deepcopy(model))")
    with slot.lock:
        slot.owner, slot.what = me, what
        try:
            yield
        finally:
            slot.owner = slot.what = None

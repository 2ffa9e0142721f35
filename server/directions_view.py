"""Attribute directions as one caller may see them: fitted over the models that caller may read.

A stored direction (`w2wreg direction fit`) is fitted over every labelled model of its subspace, private
ones included: its vector and its score's mean and std are statistics of those models. A caller who may
not read one of the labelled models gets the direction fitted again (same method, same debiasing) over
the labelled models they may read, so nothing of a hidden model reaches them through the list, the
sliders, a preview's edit, an edit or a mix; one that cannot be fitted over what they may read (too few
models, one class only) is missing for them, as an unfitted direction is. A caller who may read every
labelled model gets the stored direction.
"""

from __future__ import annotations

from registry import edits, wspace
from server.access import ModelView
from server.subspace_view import usable
from w2w.directions import Direction
from w2w.errors import DirectionError

_CACHE = "directions"


class DirectionView:
    """The directions one caller may see; build one per request, under state.lock. `load` is an edits.Loader."""

    def __init__(self, view: ModelView):
        self.view = view

    def load(self, reg, sm: wspace.SpaceModel, attribute: str) -> Direction | None:
        if not usable(self.view, sm):  # a direction's coordinates are the subspace's (server.subspace_view)
            return None
        stored = edits.load_direction(reg, sm, attribute)
        if stored is None or not self.view.hidden:
            return stored
        try:
            ids = {i for a in (attribute, *stored.debiased_against) for i in edits.labelled(reg, sm, a)[0]}
        except DirectionError:  # an attribute no model has any more
            return None
        if not ids & self.view.hidden:
            return stored
        # refitted over the visible labelled models: the same for every caller who sees the same ones
        key = (sm.id, attribute, frozenset(ids - self.view.hidden))
        version = reg.catalog.version()
        cached = self.view.state.cache.get(_CACHE)
        if cached is None or cached[0] != version:
            cached = self.view.state.cache[_CACHE] = (version, {})
        fits = cached[1]
        if key not in fits:
            try:
                fits[key] = edits.compute_direction(
                    reg, sm, attribute, stored.method, stored.debiased_against, keep=self.view.can_read
                )
            except DirectionError:
                fits[key] = None
        return fits[key]

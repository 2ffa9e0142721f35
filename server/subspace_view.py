"""Whether one caller may use a space's fitted subspace: only when they may read every model it was fitted over.

A subspace (`w2wreg fit`) is a statistic of the models it was fitted over: its basis, the mean and std that
standardize the weights, the per-coefficient Gaussians of `sample`, the explained variance and the error
scale of `well_explained`. Every answer made through it (a model's coefficients and projection, the map,
samples, edits along attribute directions, a mix in the subspace, a preview's sliders) tells something of
those models. So a caller who may not read one of them gets none of these: a clear 403 where they asked
for it, the part left out where it is one part of a larger answer (a model's `projection`, a preview's
sliders). Fitting again over models everyone may read (`w2wreg fit --where ...`) gives it back to all.
Models projected into the subspace after its fit are not part of it: a private model pushed later hides
nothing of it.
"""

from __future__ import annotations

from registry import wspace
from server.access import ModelView
from w2w.errors import W2WError


class SubspaceHidden(W2WError, PermissionError):
    """The caller may not read every model a subspace was fitted over (a 403)."""


def usable(view: ModelView, sm: wspace.SpaceModel | None) -> bool:
    """Whether the caller of `view` may read every model `sm` was fitted over (None, no subspace: vacuously)."""
    if sm is None or not view.hidden:
        return True
    return view.hidden.isdisjoint(int(i) for i in sm.sub.model_ids)


def require_usable(view: ModelView, sm: wspace.SpaceModel | None, what: str) -> None:
    """SubspaceHidden (403) naming `what` when the caller may not use `sm`."""
    if not usable(view, sm):
        assert sm is not None
        raise SubspaceHidden(
            f"{what} goes through subspace {sm.id} of space {sm.space_id}, which was fitted over models you may "
            "not read (its basis and statistics tell of them); the operator can fit one over models everyone "
            "may read: `w2wreg fit --where ...`"
        )

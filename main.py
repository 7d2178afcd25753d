"""Cloud Function entry points (functions-framework).

Kept thin on purpose: each entry point decodes its trigger and hands over to ``reconcile``.
The event, sweep and repair handlers arrive with the event-driven pipeline; until then this
module only pins the deployable layout that ``cloudbuild.yaml`` will target.
"""

"""The model registry side of Kiln, on MLflow's client API (registered models, versions, aliases,
tags; never the deprecated stages API).

- `store`: a client for a tracking URI; experiments and registered models created idempotently.
- `refs`: `NAME`, `NAME/3`, `NAME@production`, `models:/NAME@production` parsed and resolved.
- `fetch`: a version's logged artifacts downloaded and checked against their sha256 manifests.
- `promotion`: gated promotion to staging and production, rollback, and the audit tags on versions.
"""

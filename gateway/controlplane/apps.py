"""Applications: which routers and replicas serve a request path, like Ray's HAProxy frontend.

Ray's HAProxy config (HAPROXY_CONFIG_TEMPLATE in ray/serve/_private/haproxy_templates.py, Ray 2.60.0)
has one backend per Serve application, matched by route prefix, longest first (`path_beg <prefix>/` or an
exact match), with `/` last. Each application keeps its own replicas, its own ingress request routers and
the fallback proxy.
An `App` is one such backend; the `AppTable` matches a path to one.

Static mode is one app at `/`: `AppTable.single` is then that app, and the relay's lookup is
one attribute read, so static users pay nothing for apps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.controlplane.targets import TargetSet


def normalize_prefix(prefix: str) -> str:
    """`/llm/` and `/llm` are one prefix; the root stays `/`."""
    prefix = "/" + prefix.strip("/")
    return prefix


@dataclass(eq=False)
class App:
    name: str
    prefix: str
    targets: TargetSet
    # The gateway attaches the app's RouterClient (it owns the router options and the pools).
    router: Any = field(default=None, repr=False)
    # Served model ids (learned from the replicas' /v1/models), for --route-by-model.
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.prefix = normalize_prefix(self.prefix)
        self.prefix_bytes = self.prefix.encode("latin-1")

    def matches(self, path: bytes) -> bool:
        prefix = self.prefix_bytes
        if prefix == b"/":
            return True
        return path == prefix or path.startswith(prefix + b"/")


AppsChanged = Callable[[list[App], list[App]], None]


class AppTable:
    """Apps by name, matched longest prefix first; listeners hear of apps added and removed."""

    def __init__(self, apps: Iterable[App] = ()):
        self._by_name: dict[str, App] = {}
        self._ordered: list[App] = []
        # Set when the table is exactly one app at `/`: every path goes there, no matching needed.
        self.single: App | None = None
        self.listeners: list[AppsChanged] = []
        # model id -> app (for --route-by-model), rebuilt when apps or their models change.
        self.model_table: dict[str, App] = {}
        for app in apps:
            self._by_name[app.name] = app
        self._reorder()

    def _reorder(self) -> None:
        # Longest prefix first and `/` last, as Ray's HAProxy sorts its backends; ties by name, for stability.
        self._ordered = sorted(self._by_name.values(), key=lambda app: (-len(app.prefix), app.name))
        only = self._ordered[0] if len(self._ordered) == 1 else None
        self.single = only if only is not None and only.prefix == "/" else None
        self.reindex_models()

    def reindex_models(self) -> None:
        self.model_table = self.by_model()

    def __iter__(self) -> Iterator[App]:
        return iter(self._ordered)

    def __len__(self) -> int:
        return len(self._ordered)

    def get(self, name: str) -> App | None:
        return self._by_name.get(name)

    def match(self, url: bytes) -> App | None:
        """The app serving this request target (path and query), or None (a 404, as in HAProxy)."""
        single = self.single
        if single is not None:
            return single
        path = url.split(b"?", 1)[0]
        for app in self._ordered:
            if app.matches(path):
                return app
        return None

    def add(self, app: App) -> None:
        if app.name in self._by_name:
            raise ValueError(f"app {app.name!r} is already in the table")
        self._by_name[app.name] = app
        self._reorder()
        for listener in self.listeners:
            listener([app], [])

    def remove(self, name: str) -> App | None:
        app = self._by_name.pop(name, None)
        if app is None:
            return None
        self._reorder()
        for listener in self.listeners:
            listener([], [app])
        return app

    def set_prefix(self, app: App, prefix: str) -> None:
        app.prefix = normalize_prefix(prefix)
        app.prefix_bytes = app.prefix.encode("latin-1")
        self._reorder()

    # -- views over every app
    def all_targets(self) -> list:
        return [target for app in self._ordered for target in app.targets.targets]

    def by_model(self) -> dict[str, App]:
        """Model id -> the app serving it (the longest prefix wins when two apps serve one model)."""
        table: dict[str, App] = {}
        for app in self._ordered:
            for model in app.models:
                table.setdefault(model, app)
        return table

    def routes(self) -> dict[str, str]:
        """`{prefix: app}`, the shape of Ray's HAProxy `/-/routes`."""
        return {app.prefix: app.name for app in self._ordered}
